"""ppo_continuous.py's envs: actions clipped on the way to the env, observation normalization and clipping, reward
scaling and clipping (in the reference implementation's order), the statistics saved with the agent, MuJoCo's state in
checkpoints, rendering."""

import math
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.wrappers.utils import RunningMeanStd

import ppo_continuous as ppo
from helpers import ROOT, ConstantEnv, box, load, same_params, spaces, tiny

RUN = dict(total_timesteps=1024, num_steps=256, num_minibatches=4, update_epochs=2)  # 4 updates, 4 minibatches each


def cheetah(**options):
    """One HalfCheetah env with the script's wrappers, built from these options."""
    return ppo.make_envs(ppo.Args(env_id="HalfCheetah-v5", **options), 1)


def random_steps(envs, n=200, seed=0):
    """Observations and rewards of n steps of random actions, from reset(seed)."""
    obs, _ = envs.reset(seed=seed)
    rng, all_obs, rewards = np.random.default_rng(seed), [obs], []
    for _ in range(n):
        obs, reward, *_ = envs.step(rng.uniform(-1, 1, size=(1, 6)).astype(np.float32))
        all_obs.append(obs)
        rewards.append(reward)
    return np.concatenate(all_obs), np.concatenate(rewards)


def bare_cheetah(n=200, seed=0):
    """The same random actions in a bare env: its observations and rewards (no reset within 1000 steps)."""
    env, rng = gym.make("HalfCheetah-v5"), np.random.default_rng(seed)
    obs, steps = [env.reset(seed=seed)[0]], [env.step(rng.uniform(-1, 1, size=6).astype(np.float32)) for _ in range(n)]
    return np.array(obs + [s[0] for s in steps]), np.array([s[1] for s in steps])


def test_the_stored_action_is_unclipped_and_the_env_gets_a_clipped_copy(monkeypatch):
    seen_by_env, trained_on = [], []
    original_step, original_evaluate = ConstantEnv.step, ppo.Agent.get_action_and_value
    monkeypatch.setattr(ConstantEnv, "step", lambda self, a: seen_by_env.append(np.array(a)) or original_step(self, a))
    monkeypatch.setattr(
        ppo.Agent,
        "get_action_and_value",
        lambda self, obs, action=None, *r: (
            trained_on.append(action.detach().clone()) or original_evaluate(self, obs, action, *r)
        ),
    )
    ppo.train(tiny(ppo, RUN, env_id="TestTerminateContinuous-v0", total_timesteps=256, num_envs=1))
    sent, stored = np.concatenate(seen_by_env), torch.cat([a.flatten(0, -2) for a in trained_on])
    assert np.abs(sent).max() <= 1.0  # the env's bounds are [-1, 1]; the initial std is 1
    assert stored.abs().max() > 1.5  # so the sampled actions often fall outside them


def test_unbounded_actions_are_explained_not_refused(capsys):
    assert ppo.train(tiny(ppo, RUN, env_id="TestUnbounded-v0", total_timesteps=256))["global_step"] == 256
    assert "unbounded action dimensions" in capsys.readouterr().err


def test_observations_are_normalized_by_their_running_mean_and_std():
    obs, _ = random_steps(cheetah(clip_obs=1e9))
    # gymnasium's running mean/std (from mean 0, variance 1 with weight 1e-4), updated with each observation before
    # it is normalized.
    stats, expected = RunningMeanStd(shape=(17,)), []
    for x in bare_cheetah()[0]:
        stats.update(x[None])
        expected.append((x - stats.mean) / np.sqrt(stats.var + 1e-8))
    np.testing.assert_allclose(obs, np.array(expected), rtol=1e-5, atol=1e-5)
    assert np.abs(obs[-50:].mean(0)).max() < 1.5 and not np.allclose(obs, bare_cheetah()[0], atol=0.1)


def test_observations_are_clipped_to_clip_obs():
    obs, _ = random_steps(cheetah(clip_obs=0.1))
    assert np.abs(obs).max() <= np.float32(0.1) and (np.abs(obs) == np.float32(0.1)).mean() > 0.2


def test_scaled_rewards_are_clipped_to_clip_reward():
    _, rewards = random_steps(cheetah(clip_reward=0.1))
    _, unclipped = random_steps(cheetah(clip_reward=1e9))
    assert np.abs(unclipped).max() > 0.1
    np.testing.assert_array_equal(rewards, np.clip(unclipped, -0.1, 0.1))


def reference_scaling(rewards, ends, gamma):
    """The reference implementation's reward scaling (baselines' VecNormalize), one env: the discounted return adds
    the reward, its running variance (from 1, weight 1e-4) takes the return, the reward is divided by its std, and
    the return restarts at 0 after every episode end."""
    stats, ret, scaled = RunningMeanStd(shape=()), 0.0, []
    for r, end in zip(rewards, ends):
        ret = gamma * ret + r
        stats.update(np.array([ret]))
        scaled.append(r / np.sqrt(stats.var + 1e-8))
        ret = 0.0 if end else ret
    return np.array(scaled)


def test_rewards_are_divided_by_the_running_std_of_the_discounted_return():
    _, scaled = random_steps(cheetah(gamma=0.9, clip_reward=1e9))
    raw = bare_cheetah()[1]
    np.testing.assert_allclose(scaled, reference_scaling(raw, np.zeros(len(raw)), 0.9), rtol=1e-5)
    assert not np.allclose(scaled, raw, rtol=0.1)


@pytest.mark.parametrize("how", ["terminated", "truncated"])
def test_the_discounted_return_restarts_at_every_episode_end(how):
    # Episodes of 3 steps with rewards 1, 2, 4, ended by termination or by a time limit. As in the reference, the
    # terminal reward joins the return before the statistics see it, nothing of one episode is carried into the
    # next, and the step that only resets the env (reward 0) adds nothing to the statistics.
    class Steps(gym.Env):
        observation_space, action_space = box(1), gym.spaces.Box(-1, 1, (1,), np.float32)

        def reset(self, *, seed=None, options=None):
            self.t = 0
            return np.zeros(1, np.float32), {}

        def step(self, action):
            self.t += 1
            return np.zeros(1, np.float32), float(2 ** (self.t - 1)), how == "terminated" and self.t == 3, False, {}

    env_id = f"TestSteps{how}-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=Steps, max_episode_steps=None if how == "terminated" else 3)
    envs = ppo.make_envs(ppo.Args(env_id=env_id, gamma=0.5, clip_reward=1e9), 1)
    envs.reset(seed=0)
    got = [envs.step(np.zeros((1, 1), np.float32))[1][0] for _ in range(4 * 4)]
    real = [i for i in range(16) if i % 4 != 3]  # every fourth step only resets the env
    rewards, ends = [2.0 ** (i % 4) for i in real], [i % 4 == 2 for i in real]
    np.testing.assert_allclose(np.array(got)[real], reference_scaling(rewards, ends, 0.5), rtol=1e-6)
    assert ppo.reward_normalizer(envs).return_rms.count == pytest.approx(len(real) + 1e-4)


def test_the_return_statistics_take_only_the_envs_whose_step_is_a_transition():
    # Two envs whose episodes end at different steps (2 and 3 steps, rewards 1, 2, 4): while one env only resets,
    # the other takes a real step. The statistics take the discounted returns of the real steps alone, none of the
    # resetting env's.
    class Episodes(gym.Env):
        observation_space = box(1)
        action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

        def reset(self, *, seed=None, options=None):
            if seed is not None:  # env i is seeded with i: 2-step episodes in env 0, 3-step ones in env 1
                self.length = 2 + seed
            self.t = 0
            return np.zeros(1, np.float32), {}

        def step(self, action):
            self.t += 1
            return np.zeros(1, np.float32), float(2 ** (self.t - 1)), self.t == self.length, False, {}

    if "TestTwoLengths-v0" not in gym.registry:
        gym.register("TestTwoLengths-v0", entry_point=Episodes)
    envs = ppo.make_envs(ppo.Args(env_id="TestTwoLengths-v0", gamma=0.5, clip_reward=1e9, async_envs=False), 2)
    envs.reset(seed=0)
    for _ in range(12):  # env 0: 4 episodes and their reset steps; env 1: 3
        envs.step(np.zeros((2, 1), np.float32))
    # The returns by hand, gamma 0.5: 1, 0.5 * 1 + 2 = 2.5, then 0.5 * 2.5 + 4 = 5.25.
    returns = np.array([1.0, 2.5] * 4 + [1.0, 2.5, 5.25] * 3)
    # gymnasium's running statistics start at mean 0, variance 1, weight 1e-4; batches pool into one.
    prior, n = 1e-4, len(returns)
    count = prior + n
    mean = returns.sum() / count
    squares = prior + ((returns - returns.mean()) ** 2).sum() + returns.mean() ** 2 * prior * n / count
    stats = ppo.reward_normalizer(envs).return_rms
    assert stats.count == pytest.approx(count, rel=1e-12)
    assert stats.mean == pytest.approx(mean, rel=1e-9)
    assert stats.var == pytest.approx(squares / count, rel=1e-9)


def test_normalization_statistics_are_part_of_the_saved_model(in_tmp_dir):
    result = ppo.train(tiny(ppo, RUN, save_model=True))
    saved = load("runs/tiny/agent.pt")["env_stats"]["obs_rms"]
    for k in ("mean", "var"):
        assert torch.equal(saved[k], result["env_stats"]["obs_rms"][k])
    assert saved["count"] == result["env_stats"]["obs_rms"]["count"] > 1000
    assert not torch.allclose(saved["var"], torch.ones_like(saved["var"]))
    # Evaluation uses them frozen: playing episodes does not move them.
    envs = ppo.make_envs(tiny(ppo, RUN), 1)
    ppo.load_env_stats(envs, {"obs_rms": saved})
    envs.reset(seed=0)
    for _ in range(50):
        envs.step(np.zeros((1, 1), np.float32))
    after = ppo.rms_to_dict(ppo.obs_normalizer(envs).obs_rms)
    assert torch.equal(after["mean"], saved["mean"]) and after["count"] == saved["count"]


def test_evaluation_normalizes_with_the_saved_statistics(in_tmp_dir, monkeypatch):
    ppo.train(tiny(ppo, RUN, save_model=True))
    saved = load("runs/tiny/agent.pt")["env_stats"]["obs_rms"]
    seen, act = [], ppo.Agent.act
    monkeypatch.setattr(ppo.Agent, "act", lambda self, obs, *a: seen.append(obs.clone()) or act(self, obs, *a))
    ppo.evaluate("runs/tiny/agent.pt", episodes=1, seed=5)
    # The first observation the agent gets is the env's reset observation, normalized by the saved statistics.
    raw, _ = gym.make("InvertedPendulum-v5").reset(seed=5)
    expected = np.clip((raw - saved["mean"].numpy()) / np.sqrt(saved["var"].numpy() + 1e-8), -10, 10)
    np.testing.assert_allclose(seen[0][0].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, np.clip(raw, -10, 10), atol=1e-2)  # fresh statistics would give other inputs


def test_resume_mid_episode_in_mujoco_is_exact(in_tmp_dir):
    # HalfCheetah episodes last 1000 steps, so the checkpoint falls mid-episode: the simulator's state, its random
    # generator and the normalization statistics must all come back.
    kw = dict(env_id="HalfCheetah-v5", total_timesteps=2048)
    straight = ppo.train(tiny(ppo, RUN, run_name="straight", **kw))
    ppo.train(tiny(ppo, RUN, run_name="cut", checkpoint_every=1, **kw), stop_at_step=1024)
    resumed = ppo.train(tiny(ppo, RUN, run_name="cut", resume="runs/cut/checkpoint.pt", **kw))
    assert resumed["global_step"] == 2048 and straight["episodes"]["returns"] == resumed["episodes"]["returns"]
    assert same_params(straight["agent"].state_dict(), resumed["agent"].state_dict())
    assert torch.equal(straight["env_stats"]["obs_rms"]["mean"], resumed["env_stats"]["obs_rms"]["mean"])


def test_egl_is_asked_for_only_where_libegl_exists():
    # Asking MuJoCo for EGL without libEGL makes `import mujoco` fail, which would stop training itself.
    code = (
        "import ctypes.util, os, sys; ctypes.util.find_library = lambda name: None; "
        "os.environ.pop('MUJOCO_GL', None); os.environ.pop('DISPLAY', None); sys.path.insert(0, sys.argv[1]); "
        "import ppo_continuous; print(os.environ.get('MUJOCO_GL'))"
    )
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr[-2000:]


def test_the_policy_loss_moves_the_state_independent_log_std():
    _, agent = None, ppo.Agent(spaces(box(4), box(2)))
    obs, act = torch.randn(16, 4), torch.randn(16, 2)
    _, newlogp, entropy, newvalue, _ = agent.get_action_and_value(obs, act)
    z = torch.zeros(16)
    loss, _ = ppo.ppo_loss(
        newlogp,
        newlogp.detach() - 0.05,
        torch.randn(16),
        newvalue,
        z,
        z,
        entropy,
        clip_coef=0.2,
        vf_coef=0.0,
        ent_coef=0.01,
    )
    loss.backward()
    assert agent.actor_logstd.grad is not None and agent.actor_logstd.grad.any()
    assert math.isfinite(loss.item())
