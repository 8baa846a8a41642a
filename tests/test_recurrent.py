"""--lstm in every script: the five LSTM details of Huang et al. 2022 (initialization, zero initial state, the state
reset at every episode's end, minibatches of whole sequences, the states rebuilt in the update), and what must keep
working with it (action masks, MultiDiscrete actions, exact resume, evaluation, --async-envs, --compile)."""

import dataclasses
import importlib
import itertools

import gymnasium as gym
import numpy as np
import pytest
import torch

from helpers import CueEnv, assert_bad_input, box, load, same_params, spaces, tiny

HIDDEN = 8  # units: enough for a state that remembers, small enough for fast runs
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]  # the GPU's kernels too, where there is one


def lstm_args(ppo, **kw):
    return tiny(ppo, lstm=True, lstm_hidden_size=HIDDEN, **kw)


def small_envs(ppo):
    """The spaces of a small env of the script's family: one 84x84 frame (Atari), or 5 numbers."""
    if ppo.__name__ == "ppo_atari":
        return spaces(gym.spaces.Box(0, 255, (1, 84, 84), np.uint8), gym.spaces.Discrete(4))
    return spaces(box(5), gym.spaces.Discrete(3) if ppo.__name__ == "ppo_discrete" else box(2))


def cue_run(ppo, monkeypatch, lives=1, **kw):
    """Args of a run on CueEnv (3-step episodes, two envs that differ only in their first episode's cue); Atari gets
    it as frames, through make_env, with that many lives in each game."""
    if ppo.__name__ == "ppo_atari":
        monkeypatch.setattr(ppo, "check_env", lambda env_id: None)
        monkeypatch.setattr(
            ppo,
            "make_env",
            lambda env_id, idx, video_dir=None, sticky=None, frames=4: lambda: CueEnv(image=frames, lives=lives),
        )
    env_id = "TestCueContinuous-v0" if ppo.__name__ == "ppo_continuous" else "TestCue-v0"
    return lstm_args(ppo, **{"env_id": env_id, "num_envs": 2, "num_steps": 16, "num_minibatches": 2, "seed": 1, **kw})


class Steps(list):
    """The steps of the actor's LSTM; critic: those of the critic's own LSTM, where it has one."""

    critic: list

    def clear(self):
        super().clear()
        self.critic.clear()

    def starts_at_zero(self) -> bool:
        """Whether the first step of every LSTM started from a zero state."""
        return all(not taken[0][0].any() for taken in (self, self.critic) if taken)


def spy_recur(ppo, monkeypatch, replays=None) -> Steps:
    """Every step the LSTM takes in a rollout or an evaluation (under inference mode): (state in, goes_on, output,
    state out), each row an env; the critic's own LSTM's steps (ppo_discrete.py, ppo_continuous.py) in .critic.
    replays, a list, also gets every sequence each LSTM replays after a rollout: (the rollout steps taken so far, its
    outputs)."""
    steps, recur = Steps(), ppo.recur
    steps.critic = []
    # The agent steps its LSTMs in turn: the actor's, then the critic's own (Atari has one LSTM).
    turns = itertools.cycle([steps] if ppo.__name__ == "ppo_atari" else [steps, steps.critic])

    def spy(lstm, x, state, goes_on):
        out, new = recur(lstm, x, state, goes_on)
        taken = next(turns)
        if torch.is_inference_mode_enabled():
            taken.append((state.clone(), torch.as_tensor(goes_on).clone(), out.clone(), new.clone()))
        elif replays is not None and x.dim() == 3:
            replays.append((len(steps), out.detach().clone()))
        return out, new

    monkeypatch.setattr(ppo, "recur", spy)
    return steps


# ----------------------------------------------------------------------------------------------------
# LSTM details 1 and 2: initialization, and the state an episode starts from
# ----------------------------------------------------------------------------------------------------
def lstms(agent) -> list:
    """The agent's LSTMs: the actor's, then the critic's own where it has one (ppo_discrete.py, ppo_continuous.py)."""
    return [agent.lstm] + ([agent.critic_lstm] if hasattr(agent, "critic_lstm") else [])


def test_lstm_weights_are_orthogonal_and_biases_zero(ppo):
    torch.manual_seed(0)
    envs = small_envs(ppo)
    agent = ppo.Agent(envs, HIDDEN)
    # h and c of each LSTM: Atari's one (the reference's), the actor's and the critic's in the other scripts.
    assert len(lstms(agent)) == (1 if ppo.__name__ == "ppo_atari" else 2)
    assert agent.state_size == 2 * HIDDEN * len(lstms(agent))
    assert ppo.Agent(envs).state_size == 0 and ppo.Agent(envs).lstm is None
    named = [(name, param) for lstm in lstms(agent) for name, param in lstm.named_parameters()]
    assert len(named) == 4 * len(lstms(agent))
    for name, param in named:
        if name.startswith("bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
        else:  # (4 * hidden, inputs): orthonormal columns when it is tall, rows when it is wide
            w = param.detach().double()
            gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
            torch.testing.assert_close(gram, torch.eye(len(gram), dtype=torch.double), atol=1e-5, rtol=0)


def test_the_state_starts_at_zero_in_training_evaluation_and_a_resume_with_new_episodes(ppo, monkeypatch):
    # A checkpoint without its envs (one cannot be pickled) resumes with new episodes: from a zero state, not the
    # saved one, which belongs to the episodes that are gone.
    steps = spy_recur(ppo, monkeypatch)
    kw = dict(env_id="Acrobot-v1") if ppo.__name__ == "ppo_discrete" else {}  # CartPole's own vector env pickles whole
    batch = tiny(ppo).batch_size
    ppo.train(
        lstm_args(ppo, checkpoint_every=1, total_timesteps=3 * batch, save_model=True, **kw), stop_at_step=2 * batch
    )
    assert steps.starts_at_zero()  # the first step of training
    saved = load("runs/tiny/checkpoint.pt")["ranks"][0]["carried"][2]
    assert saved.abs().sum() > 0.1  # what the crash-free resume would have gone on from
    monkeypatch.setattr(ppo, "env_state", lambda env: (_ for _ in ()).throw(TypeError("cannot pickle a handle")))
    ppo.train(
        lstm_args(ppo, run_name="cut", checkpoint_every=1, total_timesteps=3 * batch, **kw), stop_at_step=2 * batch
    )
    steps.clear()
    ppo.train(lstm_args(ppo, run_name="cut", total_timesteps=3 * batch, resume="runs/cut/checkpoint.pt", **kw))
    assert steps.starts_at_zero()
    steps.clear()
    ppo.evaluate("runs/tiny/agent.pt", episodes=1)
    assert steps.starts_at_zero()


def test_each_loss_trains_the_lstm_it_reads(ppo):
    # ppo_atari.py, as the reference's ppo_atari_lstm.py: the critic reads the one LSTM's output as it is, so the value
    # loss trains the LSTM (and the CNN) as well as the policy loss. ppo_discrete.py and ppo_continuous.py: the critic
    # has an LSTM of its own, and each loss trains its own LSTM and not the other's.
    torch.manual_seed(0)
    atari = ppo.__name__ == "ppo_atari"
    agent = ppo.Agent(small_envs(ppo), HIDDEN)
    obs = torch.randint(0, 256, (6, 3, 1, 84, 84), dtype=torch.uint8) if atari else torch.randn(6, 3, 5)
    state, goes_on = torch.randn(3, agent.state_size), torch.ones(6, 3, dtype=torch.bool)
    trains = {"policy": [agent.lstm], "value": [agent.lstm] if atari else [agent.critic_lstm]}
    for part in ("policy", "value"):
        agent.zero_grad()
        _, logp, _, value, _ = agent.get_action_and_value(obs, None, state, goes_on)
        (logp.sum() if part == "policy" else value.sum()).backward()
        for lstm in lstms(agent):
            moved = [p.grad is not None and p.grad.abs().sum() > 0 for p in lstm.parameters()]
            assert all(moved) if any(lstm is m for m in trains[part]) else not any(moved), part


def test_with_lstm_rewards_are_scaled_and_returns_reported_unscaled():
    # ppo_discrete.py: with --lstm the value loss trains the LSTM, and CartPole's returns of hundreds would drown it;
    # rewards are divided by the running std of the discounted return (ScaleReward, as ppo_continuous.py always does).
    # Episode returns are the env's own; without --lstm the rewards are left as they are.
    ppo = importlib.import_module("ppo_discrete")
    for lstm in (False, True):
        envs = ppo.make_envs(tiny(ppo, env_id="CartPole-v1", lstm=lstm), 2)
        envs.reset(seed=0)
        rewards, returns = [], []
        for _ in range(300):
            _, reward, _, _, info = envs.step(np.zeros(2, dtype=np.int64))  # always left: short episodes
            rewards.append(reward)
            returns += info["episode"]["r"][info["_episode"]].tolist() if "_episode" in info else []
        rewards = np.concatenate(rewards[-100:])  # once the return statistics have settled
        assert returns and all(r == int(r) and r > 5 for r in returns), returns  # whole steps: the env's own
        if lstm:  # discounted returns of 1 to about 10 within each episode: a std of 2 to 3 (the rewards about 0.4)
            assert np.all((rewards == 0) | ((rewards > 0.2) & (rewards < 0.6))), rewards
        else:
            assert set(rewards.tolist()) <= {0.0, 1.0}


# ----------------------------------------------------------------------------------------------------
# LSTM detail 3: no memory crosses an episode's end, in the rollout, the update's replay and evaluation
# ----------------------------------------------------------------------------------------------------
def cue_outputs(ppo, monkeypatch, device="cpu", lives=1) -> tuple[dict, list]:
    """Train on CueEnv (env 0 seeded 1, env 1 seeded 2), then evaluate the agent with seed 1 and with seed 2. Returns
    the LSTM's outputs, (steps, the two envs or seeds, ...): in the rollout, the values GAE gets, the replays after the
    first rollout (one minibatch: both envs under the same parameters, each replay's outputs side by side) and
    evaluation; and each seed's evaluation steps (spy_recur)."""
    replays, values, gae = [], [], ppo.compute_gae
    steps = spy_recur(ppo, monkeypatch, replays)
    monkeypatch.setattr(ppo, "compute_gae", lambda rewards, v, *a: values.append(v.clone()) or gae(rewards, v, *a))
    args = cue_run(ppo, monkeypatch, lives, total_timesteps=64, num_minibatches=1, save_model=True)
    ppo.train(dataclasses.replace(args, cuda=device == "cuda"))
    seen = {
        "rollout": torch.stack([out for _, _, out, _ in steps]),
        "values": torch.cat([v[:-1] for v in values]),
        "replay": torch.cat([out for taken, out in replays if taken == args.num_steps], -1),
    }
    if steps.critic:
        seen["the critic's rollout"] = torch.stack([out for _, _, out, _ in steps.critic])
    evaluations = []
    critic_evaluations = []
    for seed in (1, 2):
        steps.clear()
        ppo.evaluate("runs/tiny/agent.pt", episodes=3, seed=seed)
        evaluations.append(list(steps))
        critic_evaluations.append(list(steps.critic))
    seen["evaluation"] = torch.stack([torch.stack([out[0] for _, _, out, _ in e]) for e in evaluations], 1)
    if steps.critic:
        seen["the critic's evaluation"] = torch.stack(
            [torch.stack([out[0] for _, _, out, _ in e]) for e in critic_evaluations], 1
        )
        evaluations += critic_evaluations
    return seen, evaluations


def assert_memory_ends_before(seen: torch.Tensor, step: int, what: str) -> None:
    """Two envs' outputs differ before `step` (a cue shows: the test can tell a leak) and are the same from it on."""
    assert (seen[:step, 0] - seen[:step, 1]).abs().amax() > 1e-3, what
    # Rows of one batch, made by the same kernels from the same inputs: equal up to float32 rounding.
    torch.testing.assert_close(seen[step:, 0], seen[step:, 1], atol=1e-6, rtol=0, msg=what)


@pytest.mark.parametrize("device", DEVICES)
def test_no_state_crosses_an_episode_boundary(ppo, monkeypatch, device):
    # The two envs differ only in their first episode's cue; its step 3 observation is that episode's last, and from
    # step 4 on both see the same. So every output must differ before step 4 and be the same from it on, in the
    # rollout (step by step), the values GAE gets (the rollout's), the update's replay (a sequence in one pass) and
    # evaluation.
    seen, evaluations = cue_outputs(ppo, monkeypatch, device)
    for what, outputs in seen.items():
        assert_memory_ends_before(outputs, 4, what)
    for steps in evaluations:  # the state goes on within an episode and restarts after its last step
        for (_, goes_on, _, new), (state, *_) in zip(steps, steps[1:]):
            assert torch.equal(state, new) and (goes_on.all() or not new.any())  # carried on, or zero after an end


@pytest.mark.parametrize("device", DEVICES)
def test_no_state_crosses_a_lost_life_in_atari(monkeypatch, device):
    # A lost life ends the episode for learning (though not the game): the state restarts there as at an episode's
    # end, as the reference's EpisodicLifeEnv has it. Each game has 2 lives, the first lost at step 3 (its 4th
    # step): from step 4 on both envs see the same, in the rollout, the replay and evaluation.
    ppo = importlib.import_module("ppo_atari")
    seen, evaluations = cue_outputs(ppo, monkeypatch, device, lives=2)
    for what, outputs in seen.items():
        assert_memory_ends_before(outputs, 4, what)
    for steps in evaluations:
        assert not steps[4][0].any()  # the state after the step that lost the life


@pytest.mark.parametrize("device", DEVICES)
def test_recur_over_a_sequence_is_the_same_as_step_by_step(ppo, device):
    # The update replays a whole sequence in one call per stretch between episode ends; the rollout goes step by step.
    # On a GPU the whole LSTM (cuDNN's) would run in TF32, the step in float32: about 1e-3 apart.
    torch.manual_seed(0)
    lstm = ppo.lstm_init(torch.nn.LSTM(3, HIDDEN)).to(device)
    x, goes_on = torch.randn(12, 4, 3, device=device), torch.rand(12, 4) > 0.2
    goes_on[5] = False  # every env ends an episode at once
    state = torch.randn(4, 2 * HIDDEN, device=device)
    out, last = ppo.recur(lstm, x, state, goes_on)
    outs, s = [], state
    for t in range(12):
        o, s = ppo.recur(lstm, x[t], s, goes_on[t].numpy())
        outs.append(o)
    torch.testing.assert_close(out, torch.stack(outs), atol=1e-6, rtol=0)
    torch.testing.assert_close(last, s, atol=1e-6, rtol=0)


def test_a_sequence_without_goes_on_has_no_episode_end(ppo):
    # goes_on defaults to True in the agent: for one step and for a whole sequence alike, no episode ends anywhere.
    torch.manual_seed(0)
    lstm = ppo.lstm_init(torch.nn.LSTM(5, HIDDEN))
    x, state = torch.randn(10, 3, 5), torch.randn(3, 2 * HIDDEN)
    for given, every in ((x, torch.ones(10, 3, dtype=torch.bool)), (x[0], np.ones(3, bool))):
        out, last = ppo.recur(lstm, given, state, True)
        expected_out, expected_last = ppo.recur(lstm, given, state, every)
        assert torch.equal(out, expected_out) and torch.equal(last, expected_last)
    agent = ppo.Agent(small_envs(ppo), HIDDEN)
    state = torch.randn(3, agent.state_size)
    obs = torch.randint(0, 256, (10, 3, 1, 84, 84), dtype=torch.uint8) if ppo.__name__ == "ppo_atari" else x
    action, logp, _, value, last = agent.get_action_and_value(obs, None, state, torch.ones(10, 3, dtype=torch.bool))
    _, logp_default, _, value_default, last_default = agent.get_action_and_value(obs, action, state)
    assert torch.equal(logp_default, logp) and torch.equal(value_default, value) and torch.equal(last_default, last)


# ----------------------------------------------------------------------------------------------------
# LSTM details 4 and 5: minibatches of whole sequences, replayed from the rollout's states
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("envs, minibatches, steps", [(4, 2, 8), (2, 4, 8), (1, 4, 16), (3, 4, 8), (4, 4, 6)])
def test_a_minibatch_holds_whole_env_sequences_in_time_order(ppo, envs, minibatches, steps):
    args = ppo.Args(lstm=True, num_envs=envs, num_minibatches=minibatches, num_steps=steps)
    torch.manual_seed(0)
    epochs = [ppo.minibatches(None, args, torch.device("cpu")) for _ in range(3)]
    chunks = minibatches // np.gcd(envs, minibatches)
    length = steps // chunks
    for mbs in epochs:
        assert len(mbs) == minibatches
        starts = []
        for mb in mbs:
            assert mb.shape == (length, envs * chunks // minibatches)
            assert torch.equal(mb, mb[0] + envs * torch.arange(length)[:, None])  # one env's consecutive steps
            starts += mb[0].tolist()
        # Every env's rollout, cut into stretches of `length` steps, each in exactly one minibatch.
        assert sorted(starts) == sorted(t * envs + n for t in range(0, steps, length) for n in range(envs))
    if len(epochs[0]) > 1 and len(epochs[0][0][0]) * len(epochs[0]) > 2:
        assert len({tuple(torch.cat([mb[0] for mb in mbs]).tolist()) for mbs in epochs}) > 1  # shuffled each epoch


def test_the_feedforward_minibatches_are_shuffled_transitions(ppo):
    b_inds = torch.tensor([0, 2, 3, 5, 6, 7, 9])
    torch.manual_seed(0)
    mbs = ppo.minibatches(b_inds, ppo.Args(num_minibatches=3), torch.device("cpu"))
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(mbs, torch.tensor_split(b_inds[torch.randperm(7)], 3)))


@pytest.mark.parametrize("device", DEVICES)
def test_the_replay_before_the_first_step_gives_the_rollout_s_log_probs_and_values(ppo, monkeypatch, device):
    # The first minibatch of each update is learned from before any optimizer step: its replayed sequences, started
    # from the rollout's states at their first steps (mid-rollout where an env's rollout is cut into chunks), with
    # their resets, must give exactly what the rollout's policy gave. Three updates: the later ones start from a
    # state carried over from the rollout before.
    firsts, calls, loss = [], [0], ppo.ppo_loss
    num_minibatches, epochs = 4, 2

    def spy(newlogp, oldlogp, advantages, newvalue, oldvalue, *a, **kw):
        if calls[0] % (num_minibatches * epochs) == 0:
            firsts.append(((newlogp - oldlogp).abs().amax(), (newvalue - oldvalue).abs().amax()))
        calls[0] += 1
        return loss(newlogp, oldlogp, advantages, newvalue, oldvalue, *a, **kw)

    monkeypatch.setattr(ppo, "ppo_loss", spy)
    kw = {} if ppo.__name__ == "ppo_continuous" else dict(num_envs=2)  # 2 envs or 1: each rollout cut in 2 or 4
    args = lstm_args(ppo, num_minibatches=num_minibatches, update_epochs=epochs, cuda=device == "cuda", **kw)
    ppo.train(dataclasses.replace(args, total_timesteps=3 * args.batch_size))
    assert len(firsts) == 3
    for logratio, value in firsts:
        # Log-probs and values of order 1, recomputed in float32 by other kernels: equal within a few roundings.
        assert logratio < 1e-5 and value < 1e-5, (logratio, value)


def test_minibatches_that_fit_no_whole_sequences_are_refused_in_one_line(capsys):
    ppo = importlib.import_module("ppo_discrete")
    # 3 envs and 4 minibatches: each env's 10 steps would be cut in 4 stretches, which 10 steps do not divide.
    argv = ["--lstm", "--num-envs", "3", "--num-steps", "10", "--num-minibatches", "4"]
    assert_bad_input(
        ppo.main,
        argv,
        "--num-minibatches 4 does not fit the batch (num_envs * num_steps = 3 * 10 = 30, "
        "--lstm): each minibatch takes whole env sequences",
        capsys,
    )
    assert_bad_input(ppo.main, argv, "; e.g. 3", capsys)  # 3 minibatches of one env's whole rollout each
    cont = importlib.import_module("ppo_continuous")
    cont.check_args(cont.Args(lstm=True))  # its defaults: 1 env, 32 minibatches of 64 consecutive steps each


# ----------------------------------------------------------------------------------------------------
# What keeps working with --lstm
# ----------------------------------------------------------------------------------------------------
def test_a_resumed_lstm_run_ends_exactly_as_an_uninterrupted_one(ppo):
    batch = tiny(ppo).batch_size
    straight = ppo.train(lstm_args(ppo, run_name="straight", total_timesteps=4 * batch))
    ppo.train(lstm_args(ppo, checkpoint_every=1, total_timesteps=4 * batch), stop_at_step=2 * batch)
    assert load("runs/tiny/checkpoint.pt")["ranks"][0]["carried"][2].abs().sum() > 0.1  # a state to carry over
    resumed = ppo.train(lstm_args(ppo, total_timesteps=4 * batch, resume="runs/tiny/checkpoint.pt"))
    assert straight["episodes"]["returns"] == resumed["episodes"]["returns"]
    assert same_params(straight["agent"].state_dict(), resumed["agent"].state_dict())


@pytest.mark.parametrize("env_id", ["TestMaskedMulti-v0", "TestGameOver-v0", "TestMaskedDict-v0"])
def test_masks_and_multi_discrete_actions_with_lstm(env_id):
    # StrictMaskEnv raises on an action its mask forbids: a run that ends without an error sampled only valid ones.
    ppo = importlib.import_module("ppo_discrete")
    result = ppo.train(lstm_args(ppo, env_id=env_id, total_timesteps=512, num_minibatches=2, save_model=True))
    assert result["global_step"] == 512 and result["agent"].mask_size > 0
    assert len(ppo.evaluate("runs/tiny/agent.pt", episodes=2)[0]) == 2


def test_lstm_with_async_envs_is_the_same_run():
    ppo = importlib.import_module("ppo_discrete")
    kw = dict(env_id="Acrobot-v1", total_timesteps=256)
    inline = ppo.train(lstm_args(ppo, run_name="inline", **kw))
    separate = ppo.train(lstm_args(ppo, run_name="async", async_envs=True, **kw))
    assert same_params(inline["agent"].state_dict(), separate["agent"].state_dict())


def test_lstm_with_compile_trains():
    ppo = importlib.import_module("ppo_discrete")
    result = ppo.train(lstm_args(ppo, compile=True, total_timesteps=256))
    assert result["global_step"] == 256 and all(p.isfinite().all() for p in result["agent"].parameters())
