"""PPO's loop end to end, in every script: the rollout, the bootstrap, the value target, the update's epochs and
minibatches, the learning rate, clipping, target KL, the NaN stop, seeds, and learning itself."""

import collections
import copy
import importlib
import json

import gymnasium
import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from helpers import SCRIPTS, load, logged, same_params, tiny

# Two updates of 3 envs x 16 steps, 2 epochs of 2 minibatches, on a real env of the script's kind.
LOOP = dict(num_envs=3, num_steps=16, total_timesteps=96, num_minibatches=2, update_epochs=2, cuda=False)


class Recorder(gymnasium.vector.VectorWrapper):
    """Keeps what the vector env returned at every reset and step: (observation, terminated, truncated)."""

    def __init__(self, env, returned: list):
        super().__init__(env)
        self.returned = returned

    def reset(self, **kw):
        obs, info = self.env.reset(**kw)
        self.returned.append((obs.copy(), np.zeros(len(obs), bool), np.zeros(len(obs), bool), kw.get("seed")))
        return obs, info

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        self.returned.append((obs.copy(), terminated.copy(), truncated.copy(), None))
        return obs, reward, terminated, truncated, info


def recording(ppo, monkeypatch) -> dict:
    """Spy on a run: what the vector env returned, every call of compute_gae and of the loss, and the agent."""
    seen = {"returned": [], "gae": [], "loss": [], "agents": []}
    make_envs, compute_gae, ppo_loss, init = ppo.make_envs, ppo.compute_gae, ppo.ppo_loss, ppo.Agent.__init__

    def spy_gae(rewards, values, terminations, dones, gamma, gae_lambda):
        advantages = compute_gae(rewards, values, terminations, dones, gamma, gae_lambda)
        seen["gae"].append(
            (
                rewards.clone(),
                values.clone(),
                terminations.clone(),
                dones.clone(),
                advantages.clone(),
                copy.deepcopy(seen["agents"][-1]),
                gamma,
            )
        )
        return advantages

    def spy_loss(*args, **kw):
        seen["loss"].append([a.detach().clone() for a in args])
        return ppo_loss(*args, **kw)

    monkeypatch.setattr(ppo, "make_envs", lambda *a, **kw: Recorder(make_envs(*a, **kw), seen["returned"]))
    monkeypatch.setattr(ppo, "compute_gae", spy_gae)
    monkeypatch.setattr(ppo, "ppo_loss", spy_loss)
    monkeypatch.setattr(
        ppo.Agent, "__init__", lambda self, envs, *a: init(self, envs, *a) or seen["agents"].append(self)
    )
    return seen


def test_envs_step_as_one_batch_and_each_update_learns_from_all_of_them(ppo, monkeypatch):
    seen = recording(ppo, monkeypatch)
    result = ppo.train(tiny(ppo, LOOP))
    assert [tuple(call[0].shape) for call in seen["gae"]] == [(16, 3)] * 2  # each update: T x N transitions
    assert all(obs.shape[0] == 3 for obs, *_ in seen["returned"])  # one call steps the 3 envs
    assert result["global_step"] == 3 * 16 * 2


def test_each_env_is_seeded_with_the_seed_plus_its_index(ppo, monkeypatch):
    # The vector env seeds env i with the seed it is given plus i: a run gives the seed itself, so two seeds give
    # other episodes and no env of the run shares its seed.
    seen = recording(ppo, monkeypatch)
    ppo.train(tiny(ppo, LOOP, seed=7, total_timesteps=48))
    assert [seed for *_, seed in seen["returned"] if seed is not None] == [7]


def test_the_value_target_is_the_advantage_plus_the_old_value(ppo, monkeypatch):
    seen = recording(ppo, monkeypatch)
    ppo.train(tiny(ppo, LOOP, total_timesteps=48))
    for _newlogp, _oldlogp, advantages, _newvalue, oldvalue, returns, _entropy in seen["loss"]:
        assert oldvalue.abs().max() > 1e-3  # the critic's values are not 0, so a wrong target would show
        torch.testing.assert_close(returns, advantages + oldvalue, rtol=0, atol=0)


def test_the_last_step_bootstraps_from_the_value_of_the_observation_after_it(ppo, monkeypatch):
    seen = recording(ppo, monkeypatch)
    ppo.train(tiny(ppo, LOOP, total_timesteps=48))
    ((_, values, _, _, _, agent, _),) = seen["gae"]
    last = torch.as_tensor(seen["returned"][-1][0], dtype=ppo.OBS_DTYPE)  # what the rollout's last step returned
    with torch.no_grad():
        torch.testing.assert_close(values[-1], agent.get_value(last), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(
            values[-1], agent.get_value(torch.as_tensor(seen["returned"][-2][0], dtype=ppo.OBS_DTYPE)), atol=1e-6
        )


def test_adam_epsilon_is_1e_5(ppo):
    ppo.train(tiny(ppo, LOOP, total_timesteps=48, checkpoint_every=1))
    groups = load("runs/tiny/checkpoint.pt")["optimizer"]["param_groups"]
    assert groups and all(g["eps"] == 1e-5 for g in groups)  # not torch's default 1e-8


def test_gradients_are_clipped_to_max_grad_norm_all_together(ppo):
    # The norm of all gradients as the optimizer is about to apply them. The raw gradients are far larger than
    # 1e-3, so every step must apply them scaled down to exactly that norm as a whole: without clipping the norms
    # would be larger, and clipping each parameter's gradient on its own would leave a total norm above 1e-3.
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record)
    try:
        ppo.train(tiny(ppo, LOOP, total_timesteps=48, max_grad_norm=1e-3))
    finally:
        handle.remove()
    assert len(norms) == 2 * 2  # update_epochs x num_minibatches steps
    assert norms == pytest.approx([1e-3] * len(norms), rel=1e-3)


def test_the_learning_rate_decays_linearly_from_the_full_rate_to_zero(ppo):
    ppo.train(tiny(ppo, LOOP, total_timesteps=4 * 48, learning_rate=1e-3))
    np.testing.assert_allclose(logged("runs/tiny", "charts/learning_rate"), [1e-3, 0.75e-3, 0.5e-3, 0.25e-3], rtol=1e-6)


def updates_seen(ppo, monkeypatch, **kw) -> list[torch.Tensor]:
    """Train a tiny run; return the observations of every minibatch the update learns from, in order."""
    seen, original = [], ppo.Agent.get_action_and_value

    def record(self, obs, action=None, *recurrent):
        if torch.is_grad_enabled():  # the update's calls; the rollout's run without autograd
            seen.append(obs.detach().clone())
        return original(self, obs, action, *recurrent)

    monkeypatch.setattr(ppo.Agent, "get_action_and_value", record)
    ppo.train(tiny(ppo, LOOP, **kw))
    return seen


def rows(obs: torch.Tensor) -> list[bytes]:
    return [row.numpy().tobytes() for row in obs]


def test_each_epoch_shuffles_the_batch_into_minibatches_that_cover_it(ppo, monkeypatch):
    seen = updates_seen(ppo, monkeypatch, total_timesteps=48, update_epochs=3, num_minibatches=2)
    assert len(seen) == 3 * 2  # every epoch, every minibatch
    epochs = [seen[0:2], seen[2:4], seen[4:6]]
    batch = sorted(rows(torch.cat(epochs[0])))
    for epoch in epochs:
        assert sorted(rows(torch.cat(epoch))) == batch  # every epoch learns from the whole batch, once
        assert abs(len(epoch[0]) - len(epoch[1])) <= 1
    assert len({tuple(rows(epoch[0])) for epoch in epochs}) == 3  # ... in another order each time


def test_target_kl_stops_the_update_epochs_early(ppo):
    ppo.train(tiny(ppo, LOOP, run_name="all", update_epochs=3, learning_rate=1e-2))
    ppo.train(tiny(ppo, LOOP, run_name="early", update_epochs=3, learning_rate=1e-2, target_kl=1e-8))
    assert logged("runs/all", "losses/epochs") == [3, 3]
    assert logged("runs/early", "losses/epochs") == [1, 1]  # after one epoch the policy moved by more than 1e-8


# ----------------------------------------------------------------------------------------------------
# Time limits and the step that only resets an env
# ----------------------------------------------------------------------------------------------------
CUT_ENV = {
    "ppo_discrete": "TestClock-v0",
    "ppo_continuous": "TestClockContinuous-v0",
    "ppo_atari": "TestBreakoutCut-v0",
}


def value_run(env_id: str) -> float:
    """What the critic of ppo_discrete.py learns on a one-state env: the value of its observation 0."""
    import ppo_discrete

    args = ppo_discrete.Args(
        env_id=env_id,
        total_timesteps=24_576,
        num_envs=4,
        num_steps=32,
        gamma=0.9,
        learning_rate=3e-3,
        anneal_lr=False,
        clip_vloss=False,
        norm_adv=False,
        progress=False,
        run_name=env_id,
    )
    agent = ppo_discrete.train(args)["agent"]
    with torch.no_grad():
        return agent.get_value(torch.zeros(1, 1)).item()


@pytest.fixture(scope="module", params=SCRIPTS)
def cut_run(request, tmp_path_factory):
    """A short run on an env cut by a time limit, whose final and reset observations differ: what the vector env
    returned at every step, what GAE got and gave, and what the update learned from."""
    ppo, trained = importlib.import_module(request.param), []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cut"))
        seen = recording(ppo, mp)
        original = ppo.Agent.get_action_and_value

        def spy_update(self, obs, action=None, *recurrent):
            if torch.is_grad_enabled():
                trained.append(rows(obs.detach()))
            return original(self, obs, action, *recurrent)

        mp.setattr(ppo.Agent, "get_action_and_value", spy_update)
        steps = 32 if ppo.__name__ == "ppo_atari" else 40
        args = tiny(
            ppo,
            LOOP,
            env_id=CUT_ENV[ppo.__name__],
            num_steps=steps,
            total_timesteps=3 * 3 * steps,
            gamma=0.9,
            learning_rate=1e-3,
        )
        ppo.train(args)
    return ppo, seen, trained, args


def test_a_time_limit_cut_bootstraps_from_its_final_observation(cut_run):
    ppo, seen, _, args = cut_run
    # By hand: one env, an episode ending at step 2 of 5; the value after step 2 is that of the final observation.
    g = 0.9
    ones = torch.ones(5, 1, dtype=torch.float64)
    v = torch.tensor([[0.5], [0.4], [0.3], [7.0], [0.2], [0.1]], dtype=torch.float64)
    ended = torch.tensor([[0], [0], [1], [0], [0]], dtype=torch.float64)
    cut = ppo.compute_gae(ones, v, torch.zeros_like(ended), ended, g, 1.0)
    end = ppo.compute_gae(ones, v, ended, ended, g, 1.0)
    # Truncated: 1 + g + g^2 + g^3 V(final obs) - V(s0). Terminated: 1 + g + g^2 - V(s0).
    assert cut[0, 0].item() == pytest.approx(1 + g + g**2 + g**3 * 7.0 - 0.5)
    assert end[0, 0].item() == pytest.approx(1 + g + g**2 - 0.5)
    # Nothing flows back across the episode boundary: what follows step 2 is the same either way.
    after = (1 + g * 0.2 - 7.0) + g * (1 + g * 0.1 - 0.2)
    assert cut[3, 0].item() == pytest.approx(end[3, 0].item()) == pytest.approx(after)

    # In a run, at every cut (truncated, not terminated) the advantage is r + gamma * V(final observation) - V(s):
    # the value of what the env returned at that step, not of the next episode's first observation.
    checked = apart = 0
    for r, (rewards, values, terminations, dones, advantages, agent, gamma) in enumerate(seen["gae"]):
        for t, env in zip(*np.nonzero(dones.numpy())):
            step = 1 + r * args.num_steps + t  # returned[0] is the reset
            final, terminated, truncated, _ = (x[env] if x is not None else None for x in seen["returned"][step])
            if not truncated or terminated:
                continue
            assert terminations[t, env] == 0, "a time-limit cut was treated as a terminal state"
            with torch.no_grad():
                v_final = agent.get_value(torch.as_tensor(final[None], dtype=ppo.OBS_DTYPE)).item()
                if step + 1 < len(seen["returned"]):
                    first = seen["returned"][step + 1][0][env]  # the next episode's first observation
                    apart += (
                        abs(v_final - agent.get_value(torch.as_tensor(first[None], dtype=ppo.OBS_DTYPE)).item()) > 1e-3
                    )
            assert advantages[t, env].item() == pytest.approx(
                rewards[t, env].item() + gamma * v_final - values[t, env].item(), rel=1e-4, abs=1e-5
            )
            checked += 1
    assert checked >= 3 and apart >= 1, (checked, apart)  # the test saw cuts, and could tell the two values apart

    if ppo.__name__ == "ppo_discrete":
        # What the critic learns: reward 1 forever, cut every 10 steps by a time limit. With bootstrapping the state
        # is worth 1 / (1 - 0.9) = 10; treating the cut as the end would teach about 4.4 (the mean of 1..10-step
        # returns).
        assert value_run("TestTruncate-v0") == pytest.approx(10.0, abs=0.4)


def test_the_step_that_only_resets_an_env_is_never_trained_on(cut_run):
    # Every epoch learns from exactly the rollout's transitions: each step but those that start from an episode's
    # final observation (they only reset the env), as returned by the vector env.
    ppo, seen, trained, args = cut_run
    T, per_epoch, resets = args.num_steps, args.num_minibatches, 0
    dtype = np.float32 if ppo.OBS_DTYPE == torch.float32 else np.uint8
    for r in range(len(trained) // (per_epoch * args.update_epochs)):
        expected = collections.Counter()
        for t in range(T):
            obs, terminated, truncated, _ = seen["returned"][r * T + t]  # what rollout step t starts from
            for env in range(len(obs)):
                if terminated[env] or truncated[env]:
                    resets += 1
                else:
                    expected[obs[env].astype(dtype).tobytes()] += 1
        for epoch in range(args.update_epochs):
            start = (r * args.update_epochs + epoch) * per_epoch
            assert collections.Counter(row for call in trained[start : start + per_epoch] for row in call) == expected
    assert resets >= 3  # the test saw reset steps to leave out

    if ppo.__name__ == "ppo_discrete":
        # What the critic learns: every episode is one step long and worth exactly 1. The vector env's reset steps
        # (reward 0, same observation) would drag the value toward 0.5 * (1 + 0.9) = 0.95 if they were trained on.
        assert value_run("TestTerminate-v0") == pytest.approx(1.0, abs=0.02)


# ----------------------------------------------------------------------------------------------------
# A NaN loss, seeds, compiling, learning
# ----------------------------------------------------------------------------------------------------
def test_a_nan_loss_stops_the_run_without_the_bad_step(ppo, monkeypatch):
    # The third minibatch's loss is NaN: its step and the update's later ones are not taken, the run stops at the
    # update's end, and the parameters are those after the second step. The run did not finish.
    agents, after_step, calls = [], [], []
    init, ppo_loss = ppo.Agent.__init__, ppo.ppo_loss
    monkeypatch.setattr(ppo.Agent, "__init__", lambda self, envs, *a: init(self, envs, *a) or agents.append(self))

    def nan_on_the_third(*a, **kw):
        loss, stats = ppo_loss(*a, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), stats

    monkeypatch.setattr(ppo, "ppo_loss", nan_on_the_third)
    handle = register_optimizer_step_post_hook(
        lambda opt, a, kw: after_step.append(copy.deepcopy(agents[0].state_dict()))
    )
    try:
        with pytest.raises(ppo.RunError, match="the loss became nan or infinite in update 1 "):
            ppo.train(tiny(ppo, LOOP, total_timesteps=96, checkpoint_every=1))
    finally:
        handle.remove()
    state = agents[0].state_dict()
    assert len(after_step) == 4 and all(same_params(s, after_step[1]) for s in after_step[2:])
    assert same_params(state, after_step[1]) and all(torch.isfinite(v).all() for v in state.values())
    assert json.load(open("runs/tiny/summary.json"))["finished"] is False
    assert not __import__("os").path.exists("runs/tiny/checkpoint.pt")  # a bad update is never checkpointed


def test_same_seed_same_numbers(ppo):
    a, b, c = (ppo.train(tiny(ppo, LOOP, run_name=name, seed=seed)) for name, seed in (("a", 1), ("b", 1), ("c", 2)))
    assert same_params(a["agent"].state_dict(), b["agent"].state_dict())
    assert a["episodes"]["returns"] == b["episodes"]["returns"]
    assert not same_params(a["agent"].state_dict(), c["agent"].state_dict())


def test_compiled_and_eager_runs_agree(capsys):
    # torch.compile fuses and reorders float32 arithmetic: the same updates differ in the last bits (after 2 updates
    # of 2 epochs x 2 minibatches, 5e-7 of the largest parameter for the MLPs); another action or a missing term moves
    # them far more. Compiled code samples with a generator of its own unless told to use torch's: told so here. One
    # script stands for the three: the lines that compile are the same in each.
    import torch._inductor.config

    import ppo_continuous as ppo

    eager = ppo.train(tiny(ppo, LOOP, run_name="eager", total_timesteps=144))
    with torch._inductor.config.patch(fallback_random=True):
        compiled = ppo.train(tiny(ppo, LOOP, run_name="compiled", total_timesteps=144, compile=True))
    for k, v in eager["agent"].state_dict().items():
        torch.testing.assert_close(compiled["agent"].state_dict()[k], v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logged("runs/compiled"), logged("runs/eager"), rtol=1e-5)
    assert "torch.compile: the first two updates took" in capsys.readouterr().err


def test_learns_cartpole_within_200k_steps():
    import ppo_discrete

    # The default configuration (500k-step schedule), watched for its first 200k steps.
    result = ppo_discrete.train(ppo_discrete.Args(progress=False, run_name="learn"), stop_at_step=200_000)
    returns = np.array(result["episodes"]["returns"])
    best = np.convolve(returns, np.ones(20) / 20, mode="valid").max()
    assert best >= 450, f"best mean of 20 consecutive episodes in 200k steps: {best:.1f}"


def test_learns_inverted_pendulum():
    import ppo_continuous

    # Default hyperparameters with a 100k-step schedule, watched for its first 40,960 steps.
    result = ppo_continuous.train(
        ppo_continuous.Args(env_id="InvertedPendulum-v5", total_timesteps=100_000, progress=False, run_name="learn"),
        stop_at_step=40_960,
    )
    best = np.convolve(np.array(result["episodes"]["returns"]), np.ones(10) / 10, mode="valid").max()
    assert best >= 900, f"best mean of 10 consecutive episodes: {best:.1f}"
