"""ppo_continuous.py end to end: Gaussian policy, normalization statistics, MuJoCo resume, bad input, learning."""

import glob
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import gymnasium as gym
import ppo_continuous as ppo
from gymnasium.wrappers.utils import RunningMeanStd
from helpers import ROOT, ConstantEnv, assert_bad_input, box, register_test_envs, run_script, same_params, spaces

register_test_envs()
SCRIPT = "ppo_continuous.py"
if "TestUnbounded-v0" not in gym.registry:
    class UnboundedEnv(ConstantEnv):
        def __init__(self):
            super().__init__(length=5, continuous=True)
            self.action_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)

    gym.register("TestUnbounded-v0", entry_point=UnboundedEnv)


def tiny(**kw) -> ppo.Args:
    base = dict(env_id="InvertedPendulum-v5", total_timesteps=1024, num_steps=256, num_minibatches=4, update_epochs=2,
                progress=False, run_name="tiny")
    return ppo.Args(**{**base, **kw})


def test_initialization():
    agent = ppo.Agent(spaces(box(3), box(2)))
    # Orthogonal weights scaled by the gain (gain^2 I from the product over the smaller side): sqrt(2) for
    # the hidden layers, 0.01 for the policy head, 1 for the value head; biases zero.
    for net, head_gain in ((agent.actor_mean, 0.01), (agent.critic, 1.0)):
        weights = [m.weight.detach() for m in net if isinstance(m, torch.nn.Linear)]
        for w, gain in zip(weights, [2**0.5] * (len(weights) - 1) + [head_gain]):
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            torch.testing.assert_close(gram, gain**2 * torch.eye(len(gram)), atol=1e-5 * gain**2, rtol=0)
    assert all(not layer.bias.any() for layer in agent.modules() if isinstance(layer, torch.nn.Linear))
    assert not agent.actor_logstd.any()  # the first policy's std is 1


def test_gaussian_log_prob_and_entropy_match_torch_normal():
    torch.manual_seed(0)
    agent = ppo.Agent(spaces(box(5), box(3)))
    with torch.no_grad():
        agent.actor_logstd.copy_(torch.tensor([[-0.5, 0.0, 0.7]]))
    obs, action = torch.randn(16, 5), torch.randn(16, 3) * 2
    _, logp, entropy, value = agent.get_action_and_value(obs, action)
    dist = torch.distributions.Normal(agent.actor_mean(obs), agent.actor_logstd.exp().expand(16, 3))
    torch.testing.assert_close(logp, dist.log_prob(action).sum(-1))
    torch.testing.assert_close(entropy, dist.entropy().sum(-1))
    assert value.shape == (16,)
    # Samples follow that Gaussian: mean and std within 4 standard errors, std / sqrt(n) and std / sqrt(2n).
    n = 40_000
    samples = agent.act(obs[:1].expand(n, 5)).detach()
    std = dist.stddev[0].detach()
    assert ((samples.mean(0) - dist.mean[0].detach()).abs() <= 4 * std / math.sqrt(n)).all()
    assert ((samples.std(0) - std).abs() <= 4 * std / math.sqrt(2 * n)).all()
    assert torch.equal(agent.act(obs, deterministic=True), agent.actor_mean(obs))


def test_the_stored_action_is_unclipped_and_the_env_gets_a_clipped_copy(monkeypatch):
    seen_by_env, trained_on = [], []
    original_step, original_evaluate = ConstantEnv.step, ppo.Agent.get_action_and_value

    def step(self, action):
        seen_by_env.append(np.array(action))
        return original_step(self, action)

    def evaluate(self, obs, action=None):
        trained_on.append(action.detach().clone())
        return original_evaluate(self, obs, action)

    monkeypatch.setattr(ConstantEnv, "step", step)
    monkeypatch.setattr(ppo.Agent, "get_action_and_value", evaluate)
    ppo.train(tiny(env_id="TestContinuous-v0", total_timesteps=256, num_envs=1))
    sent, stored = np.concatenate(seen_by_env), torch.cat(trained_on)
    assert np.abs(sent).max() <= 1.0  # the env's bounds are [-1, 1]; the initial std is 1
    assert stored.abs().max() > 1.5  # so the sampled actions often fall outside them


def test_end_to_end_save_and_evaluate_from_the_command_line(in_tmp_dir):
    out = run_script(SCRIPT, "--env-id", "InvertedPendulum-v5", "--total-timesteps", "512", "--num-steps", "256",
                     "--num-minibatches", "4", "--run-name", "cli", "--save-model")
    assert out.returncode == 0, out.stderr
    path = in_tmp_dir / "runs" / "cli" / "agent.pt"
    out = run_script(SCRIPT, "--eval-checkpoint", str(path), "--eval-episodes", "2")
    assert out.returncode == 0, out.stderr
    assert "2 episodes (" in out.stdout and "): return" in out.stdout


def test_normalization_statistics_are_part_of_the_saved_model(in_tmp_dir):
    result = ppo.train(tiny(save_model=True))
    saved = torch.load(in_tmp_dir / "runs" / "tiny" / "agent.pt", weights_only=True)
    for k in ("mean", "var"):
        assert torch.equal(saved["env_stats"]["obs_rms"][k], result["env_stats"]["obs_rms"][k])
    assert saved["env_stats"]["obs_rms"]["count"] == result["env_stats"]["obs_rms"]["count"] > 1000
    assert not torch.allclose(saved["env_stats"]["obs_rms"]["var"], torch.ones_like(saved["env_stats"]["obs_rms"]["var"]))

    # Same raw observations -> same actions, before saving and after loading.
    raw = np.random.default_rng(0).normal(size=(8, 4)) * 0.3

    def policy(agent, stats):
        envs = ppo.make_envs(tiny(), 1)
        ppo.load_env_stats(envs, stats)
        normed = np.clip(ppo.obs_normalizer(envs).observations(raw), -10, 10)
        return agent.act(torch.as_tensor(normed, dtype=torch.float32), deterministic=True).detach()

    loaded = ppo.Agent(spaces(box(4), box(1)))
    loaded.load_state_dict(saved["model"])
    assert torch.equal(policy(result["agent"], result["env_stats"]), policy(loaded, saved["env_stats"]))

    # Evaluation uses the statistics frozen: playing episodes does not move them.
    envs = ppo.make_envs(tiny(), 1)
    ppo.load_env_stats(envs, saved["env_stats"])
    envs.reset(seed=0)
    for _ in range(50):
        envs.step(np.zeros((1, 1), np.float32))
    after = ppo.rms_to_dict(ppo.obs_normalizer(envs).obs_rms)
    stats = saved["env_stats"]["obs_rms"]
    assert torch.equal(after["mean"], stats["mean"]) and after["count"] == stats["count"]
    returns = ppo.evaluate(str(in_tmp_dir / "runs" / "tiny" / "agent.pt"), episodes=2)
    assert returns.shape == (2,)


def test_resume_mid_episode_in_mujoco_is_exact(in_tmp_dir):
    # HalfCheetah episodes last 1000 steps, so the checkpoint falls mid-episode: the simulator's state,
    # its random generator and the normalization statistics must all come back.
    kw = dict(env_id="HalfCheetah-v5", total_timesteps=2048, num_steps=256)
    straight = ppo.train(tiny(run_name="straight", **kw))
    ppo.train(tiny(run_name="cut", checkpoint_every=1, **kw), stop_at_step=1024)
    resumed = ppo.train(tiny(resume=str(in_tmp_dir / "runs" / "cut" / "checkpoint.pt"), **kw))
    assert resumed["global_step"] == 2048
    assert same_params(straight["agent"].state_dict(), resumed["agent"].state_dict())
    assert torch.equal(straight["env_stats"]["obs_rms"]["mean"], resumed["env_stats"]["obs_rms"]["mean"])
    assert straight["episodes"]["returns"] == resumed["episodes"]["returns"]


def test_same_seed_same_numbers():
    a = ppo.train(tiny(run_name="a"))
    b = ppo.train(tiny(run_name="b"))
    assert same_params(a["agent"].state_dict(), b["agent"].state_dict())


def test_capture_video_or_a_clear_message(in_tmp_dir, capfd):
    ppo.train(tiny(capture_video=True, total_timesteps=256))
    videos = glob.glob(str(in_tmp_dir / "videos" / "tiny" / "*.mp4"))
    assert videos or "training goes on without video" in capfd.readouterr().err


BAD = [
    (["--env-id", "CartPole-v1"], "ppo_discrete.py"),
    (["--env-id", "ALE/Pong-v5"], "ppo_atari.py"),
    (["--env-id", "HalfCheeta-v5"], "HalfCheetah-v5"),
    (["--num-minibatches", "3"], "--num-minibatches 3"),
    (["--gamma", "-1"], "--gamma is -1"),
    (["--clip-obs", "0"], "--clip-obs is 0"),
    (["--resume", "nowhere.pt"], "does not exist"),
]


@pytest.mark.parametrize("argv,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_clear_line(argv, expected, capsys):
    assert_bad_input(ppo.main, argv, expected, capsys)


def test_unbounded_actions_are_explained_not_refused(capsys):
    result = ppo.train(tiny(env_id="TestUnbounded-v0", total_timesteps=256))
    assert result["global_step"] == 256
    assert "unbounded action dimensions" in capsys.readouterr().err


def test_checkpoint_of_another_script_is_refused(in_tmp_dir, capsys):
    import ppo_discrete

    ppo_discrete.train(ppo_discrete.Args(total_timesteps=512, num_steps=128, run_name="d", progress=False,
                                         save_model=True))
    assert ppo.main(["--eval-checkpoint", "runs/d/agent.pt"]) == 2
    assert "ppo_discrete.py" in capsys.readouterr().err


def test_nan_loss_stops_the_run(capsys):
    code = ppo.main(["--env-id", "TestContinuousNaN-v0", "--total-timesteps", "8192", "--num-steps", "1024",
                     "--num-minibatches", "4", "--run-name", "nan", "--no-progress"])
    assert code == 1 and "loss became nan" in capsys.readouterr().err


def test_learns_inverted_pendulum():
    # Default hyperparameters with a 100k-step schedule, watched for its first 40,960 steps.
    result = ppo.train(ppo.Args(env_id="InvertedPendulum-v5", total_timesteps=100_000, progress=False,
                                run_name="learn", seed=1), stop_at_step=40_960)
    returns = np.array(result["episodes"]["returns"])
    best = np.convolve(returns, np.ones(10) / 10, mode="valid").max()
    assert best >= 900, f"best mean of 10 consecutive episodes: {best:.1f}"



def test_egl_is_asked_for_only_where_libegl_exists():
    # Asking MuJoCo for EGL without libEGL makes `import mujoco` fail, which would stop training itself.
    code = ("import ctypes.util, os, sys; ctypes.util.find_library = lambda name: None; "
            "os.environ.pop('MUJOCO_GL', None); os.environ.pop('DISPLAY', None); sys.path.insert(0, sys.argv[1]); "
            "import ppo_continuous; print(os.environ.get('MUJOCO_GL'))")
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr[-2000:]


def test_policy_loss_sends_no_gradient_into_the_critic():
    agent = ppo.Agent(spaces(box(4), box(2)))
    obs, act = torch.randn(16, 4), torch.randn(16, 2)
    _, newlogp, entropy, newvalue = agent.get_action_and_value(obs, act)
    z = torch.zeros(16)
    loss, _ = ppo.ppo_loss(newlogp, newlogp.detach() - 0.05, torch.randn(16), newvalue, z, z, entropy,
                           clip_coef=0.2, vf_coef=0.0, ent_coef=0.01)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in agent.critic.parameters())
    assert any(p.grad is not None and p.grad.any() for p in agent.actor_mean.parameters())
    assert agent.actor_logstd.grad is not None and agent.actor_logstd.grad.any()


def cheetah(**options):
    """One HalfCheetah env with the script's wrappers, built from these options."""
    return ppo.make_envs(ppo.Args(env_id="HalfCheetah-v5", **options), 1)


def random_steps(envs, n=200, seed=0):
    """Observations and rewards of n steps of random actions, from reset(seed)."""
    obs, _ = envs.reset(seed=seed)
    rng = np.random.default_rng(seed)
    all_obs, rewards = [obs], []
    for _ in range(n):
        obs, reward, *_ = envs.step(rng.uniform(-1, 1, size=(1, 6)).astype(np.float32))
        all_obs.append(obs)
        rewards.append(reward)
    return np.concatenate(all_obs), np.concatenate(rewards)


def test_observations_are_clipped_to_clip_obs():
    obs, _ = random_steps(cheetah(clip_obs=0.1))
    assert np.abs(obs).max() <= np.float32(0.1)
    assert (np.abs(obs) == np.float32(0.1)).mean() > 0.2  # normalized observations often reach past 0.1


def test_scaled_rewards_are_clipped_to_clip_reward():
    _, rewards = random_steps(cheetah(clip_reward=0.1))
    _, unclipped = random_steps(cheetah(clip_reward=1e9))
    assert np.abs(unclipped).max() > 0.1 and np.abs(rewards).max() <= 0.1
    np.testing.assert_array_equal(rewards, np.clip(unclipped, -0.1, 0.1))


def test_rewards_are_divided_by_the_running_std_of_the_discounted_return():
    gamma = 0.9
    _, scaled = random_steps(cheetah(gamma=gamma, clip_reward=1e9))
    # The same actions in a bare env (HalfCheetah episodes last 1000 steps: no reset in 200).
    raw_env, rng = gym.make("HalfCheetah-v5"), np.random.default_rng(0)
    raw_env.reset(seed=0)
    raw = np.array([raw_env.step(rng.uniform(-1, 1, size=6).astype(np.float32))[1] for _ in range(200)])
    # gymnasium's NormalizeReward: G_t = gamma * G_{t-1} + r_t, its running variance updated with G_t
    # (starting from variance 1 with weight 1e-4), then r_t / sqrt(var + 1e-8).
    stats, ret, expected = RunningMeanStd(shape=()), 0.0, []
    for r in raw:
        ret = gamma * ret + r
        stats.update(np.array([ret]))
        expected.append(r / np.sqrt(stats.var + 1e-8))
    np.testing.assert_allclose(scaled, expected, rtol=1e-5)
    assert not np.allclose(scaled, raw, rtol=0.1)


def test_the_first_policy_has_std_1_whatever_the_state():
    torch.manual_seed(0)
    agent = ppo.Agent(spaces(box(5), box(3)))
    assert torch.equal(agent.actor_logstd.detach(), torch.zeros(1, 3))
    obs = torch.randn(64, 5) * 10  # very different states: the spread of the actions does not depend on them
    with torch.no_grad():
        _, _, entropy, _ = agent.get_action_and_value(obs)
        torch.testing.assert_close(entropy, torch.full((64,), 3 * (0.5 + 0.5 * math.log(2 * math.pi))))
        n = 40_000
        samples = agent.act(obs[:2].repeat_interleave(n, 0)).view(2, n, 3)
    # The sample std of n normal draws has a standard error of about std / sqrt(2n): 4 of them as tolerance.
    torch.testing.assert_close(samples.std(1), torch.ones(2, 3), atol=4 / math.sqrt(2 * n), rtol=0)


def test_evaluation_normalizes_with_the_saved_statistics(in_tmp_dir, monkeypatch):
    ppo.train(tiny(save_model=True))
    saved = torch.load("runs/tiny/agent.pt", weights_only=True)["env_stats"]["obs_rms"]
    seen, act = [], ppo.Agent.act
    monkeypatch.setattr(ppo.Agent, "act", lambda self, obs, deterministic=False: seen.append(obs.clone()) or
                        act(self, obs, deterministic))
    ppo.evaluate("runs/tiny/agent.pt", episodes=1, seed=5)
    # The first observation the agent gets is the env's reset observation, normalized by the saved statistics.
    raw, _ = gym.make("InvertedPendulum-v5").reset(seed=5)
    expected = np.clip((raw - saved["mean"].numpy()) / np.sqrt(saved["var"].numpy() + 1e-8), -10, 10)
    np.testing.assert_allclose(seen[0][0].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, np.clip(raw, -10, 10), atol=1e-2)  # fresh statistics would give other inputs


def test_observations_are_normalized_by_their_running_mean_and_std():
    obs, _ = random_steps(cheetah(clip_obs=1e9))
    # The same actions in a bare env, normalized by hand: gymnasium's running mean/std (starting from mean 0,
    # variance 1 with weight 1e-4), updated with each observation before it is normalized.
    raw_env, rng = gym.make("HalfCheetah-v5"), np.random.default_rng(0)
    raw = [raw_env.reset(seed=0)[0]] + [raw_env.step(rng.uniform(-1, 1, size=6).astype(np.float32))[0] for _ in range(200)]
    stats, expected = RunningMeanStd(shape=(17,)), []
    for x in raw:
        stats.update(x[None])
        expected.append((x - stats.mean) / np.sqrt(stats.var + 1e-8))
    np.testing.assert_allclose(obs, np.array(expected), rtol=1e-5, atol=1e-5)
    assert np.abs(obs[-50:].mean(0)).max() < 1.5 and not np.allclose(obs, np.array(raw), atol=0.1)


def test_track_with_wandb_offline(in_tmp_dir):
    out = run_script(SCRIPT, "--env-id", "InvertedPendulum-v5", "--total-timesteps", "256", "--num-steps", "128",
                     "--num-minibatches", "2", "--run-name", "tracked", "--track",
                     env={**__import__("os").environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr
    assert glob.glob(str(in_tmp_dir / "wandb" / "offline-run-*"))
