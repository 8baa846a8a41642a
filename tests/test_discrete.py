"""ppo_discrete.py end to end: training, outputs, resume, determinism, bad input, learning."""

import glob
import os
import signal
import subprocess
import sys
import time

import gymnasium
import numpy as np
import pytest
import torch
import tyro

import ppo_discrete as ppo
from gymnasium.spaces import Discrete
from helpers import ROOT, assert_bad_input, box, register_test_envs, run_script, same_params, spaces

register_test_envs()
SCRIPT = "ppo_discrete.py"


def tiny(**kw) -> ppo.Args:
    base = dict(total_timesteps=2048, num_envs=4, num_steps=64, progress=False, run_name="tiny")
    return ppo.Args(**{**base, **kw})


# ------------------------------------------------------------------------------------ the agent
def test_sampling_and_log_probs_match_categorical():
    torch.manual_seed(0)
    agent = ppo.Agent(spaces(box(3), Discrete(4)))
    with torch.no_grad():
        agent.actor[-1].weight.normal_(0, 2.0)  # a peaked policy, far from the near-uniform first one
    n = 100_000
    obs = torch.randn(1, 3).expand(n, 3)
    with torch.no_grad():
        actions = agent.act(obs)
        logits = agent.actor(obs[:1])
        dist = torch.distributions.Categorical(logits=logits)
        assert dist.probs.max() > 0.5
        freq = torch.bincount(actions, minlength=4).float() / n
        # Each frequency within 4 standard errors, sqrt(p (1 - p) / n), of its probability.
        bound = 4 * (dist.probs[0] * (1 - dist.probs[0]) / n).sqrt()
        assert ((freq - dist.probs[0]).abs() <= bound).all(), (freq, dist.probs[0])
        _, logp, entropy, value = agent.get_action_and_value(obs[:4], torch.arange(4))
        np.testing.assert_allclose(logp.numpy(), dist.log_prob(torch.arange(4)).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(entropy.numpy(), dist.entropy().expand(4).numpy(), rtol=1e-5, atol=1e-6)
        assert value.shape == (4,)
        assert torch.equal(agent.act(obs[:2], deterministic=True), logits.argmax(-1).expand(2))


def test_policy_loss_sends_no_gradient_into_the_critic():
    agent = ppo.Agent(spaces(box(4), Discrete(2)))
    obs, act = torch.randn(16, 4), torch.randint(0, 2, (16,))
    _, newlogp, entropy, newvalue = agent.get_action_and_value(obs, act)
    z = torch.zeros(16)
    loss, _ = ppo.ppo_loss(newlogp, newlogp.detach() - 0.05, torch.randn(16), newvalue, z, z, entropy,
                           clip_coef=0.2, vf_coef=0.0, ent_coef=0.01)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in agent.critic.parameters())
    assert any(p.grad is not None and p.grad.any() for p in agent.actor.parameters())


def test_initialization():
    agent = ppo.Agent(spaces(box(4), Discrete(2)))
    w = agent.actor[-1].weight
    # Orthogonal rows scaled by the gain: 0.01 for the policy head, 1 for the value head.
    np.testing.assert_allclose((w @ w.T).detach().numpy(), 0.01**2 * np.eye(2), atol=1e-7)
    v = agent.critic[-1].weight
    assert (v @ v.T).item() == pytest.approx(1.0, rel=1e-5)
    assert all(not layer.bias.any() for layer in agent.modules() if isinstance(layer, torch.nn.Linear))


# ------------------------------------------------------------------------------ end to end
def test_train_end_to_end_writes_logs(in_tmp_dir):
    result = ppo.train(tiny(save_model=True))
    assert result["global_step"] == 2048
    assert len(result["episodes"]["returns"]) > 0
    run_dir = in_tmp_dir / "runs" / "tiny"
    assert glob.glob(str(run_dir / "events.out.tfevents.*"))
    saved = torch.load(run_dir / "agent.pt", weights_only=True)
    assert saved["args"]["env_id"] == "CartPole-v1"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in ["losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/old_approx_kl",
                "losses/approx_kl", "losses/clipfrac", "losses/explained_variance", "losses/ess",
                "losses/grad_norm", "charts/learning_rate", "charts/SPS", "charts/episodic_return",
                "charts/episodic_length"]:
        assert tag in tags, tag
    lrs = [e.value for e in ea.Scalars("charts/learning_rate")]
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[-1] < lrs[0]  # annealed

    # Plain-file results for the benchmark suite: one row per episode, and the run's totals.
    import csv
    import json

    rows = list(csv.DictReader(open(run_dir / "episodes.csv")))
    assert len(rows) == len(result["episodes"]["returns"])
    assert [float(r["return"]) for r in rows] == result["episodes"]["returns"]
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["global_step"] == 2048 and summary["env_id"] == "CartPole-v1" and summary["sps"] > 0


def test_command_line_train_save_and_evaluate(in_tmp_dir):
    out = run_script(SCRIPT, "--total-timesteps", "1024", "--num-steps", "32", "--run-name", "cli", "--save-model")
    assert out.returncode == 0, out.stderr
    assert "step 1,024/1,024" in out.stderr  # plain progress lines when not in a terminal
    path = in_tmp_dir / "runs" / "cli" / "agent.pt"
    assert path.exists()
    out = run_script(SCRIPT, "--eval-checkpoint", str(path), "--eval-episodes", "3")
    assert out.returncode == 0, out.stderr
    assert "3 episodes (" in out.stdout and "): return" in out.stdout and "+-" in out.stdout


def test_help_lists_every_option_with_its_explanation():
    out = run_script(SCRIPT, "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for name, field in ppo.Args.__dataclass_fields__.items():
        assert "--" + name.replace("_", "-") in text, name
    assert "discount factor" in text and "GAE lambda" in text and "parallel environments" in text


def test_evaluate_function_returns_episode_returns(in_tmp_dir):
    ppo.train(tiny(save_model=True))
    returns = ppo.evaluate(str(in_tmp_dir / "runs" / "tiny" / "agent.pt"), episodes=4, seed=0)
    assert returns.shape == (4,) and (returns >= 8).all()


def test_capture_video(in_tmp_dir):
    ppo.train(tiny(capture_video=True, total_timesteps=512, num_steps=128))
    assert glob.glob(str(in_tmp_dir / "videos" / "tiny" / "*.mp4"))


# ---------------------------------------------------------------------- truncation vs termination
def critic_value(agent) -> float:
    with torch.no_grad():
        return agent.get_value(torch.zeros(1, 1)).item()


def value_run(env_id):
    args = tiny(env_id=env_id, total_timesteps=24_576, num_steps=32, gamma=0.9, learning_rate=3e-3,
                anneal_lr=False, clip_vloss=False, norm_adv=False)
    return critic_value(ppo.train(args)["agent"])


def test_truncated_episodes_bootstrap_from_the_final_observation():
    # Reward 1 forever, cut every 10 steps by a time limit. With bootstrapping the state is worth
    # 1 / (1 - 0.9) = 10; treating the cut as the end would teach about 4.4 (the mean of 1..10-step returns).
    assert value_run("TestTruncate-v0") == pytest.approx(10.0, abs=0.4)


def test_autoreset_steps_are_not_trained_on():
    # Every episode is one step long and worth exactly 1. The vector env's reset steps (reward 0, same
    # observation) would drag the value toward 0.5 * (1 + 0.9) = 0.95 if they were trained on.
    assert value_run("TestTerminate-v0") == pytest.approx(1.0, abs=0.02)


# ------------------------------------------------------------------ determinism and resume
def test_same_seed_same_numbers():
    a = ppo.train(tiny(run_name="a", total_timesteps=4096))
    b = ppo.train(tiny(run_name="b", total_timesteps=4096))
    c = ppo.train(tiny(run_name="c", total_timesteps=4096, seed=2))
    assert same_params(a["agent"].state_dict(), b["agent"].state_dict())
    assert a["episodes"]["returns"] == b["episodes"]["returns"]
    assert not same_params(a["agent"].state_dict(), c["agent"].state_dict())


def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(in_tmp_dir):
    common = ["--total-timesteps", "40960", "--num-steps", "128", "--save-model"]
    out = run_script(SCRIPT, *common, "--run-name", "straight")
    assert out.returncode == 0, out.stderr

    # Ctrl-C part-way: the script finishes its update, writes a checkpoint and exits with 130.
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, SCRIPT), *common, "--run-name", "cut"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not glob.glob("runs/cut/events.out.tfevents.*") and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    ckpt_path = in_tmp_dir / "runs" / "cut" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert 0 < ckpt["global_step"] < 40960, "the interrupt should land mid-run; raise --total-timesteps"
    assert "--resume" in err
    assert not (in_tmp_dir / "runs" / "cut" / "agent.pt").exists()

    out = run_script(SCRIPT, "--resume", str(ckpt_path))
    assert out.returncode == 0, out.stderr
    straight = torch.load("runs/straight/agent.pt", weights_only=True)["model"]
    resumed = torch.load("runs/cut/agent.pt", weights_only=True)["model"]
    assert same_params(straight, resumed)


def test_periodic_checkpoints_and_resume_in_process(in_tmp_dir):
    full = ppo.train(tiny(run_name="full", total_timesteps=4096, checkpoint_every=2))
    # Resume from the checkpoint written after the last update (16 of 16) with a longer budget.
    path = str(in_tmp_dir / "runs" / "full" / "checkpoint.pt")
    assert torch.load(path, weights_only=False)["iteration"] == 16
    more = ppo.train(tiny(total_timesteps=6144, resume=path))
    assert more["global_step"] == 6144
    assert not same_params(full["agent"].state_dict(), more["agent"].state_dict())


# ------------------------------------------------------------------------------ wandb
def test_track_with_wandb_offline_adds_no_long_wait(in_tmp_dir):
    start = time.time()
    out = run_script(SCRIPT, "--total-timesteps", "1024", "--num-steps", "32", "--run-name", "tracked", "--track",
                     env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    took = time.time() - start
    assert out.returncode == 0, out.stderr
    assert glob.glob(str(in_tmp_dir / "wandb" / "offline-run-*"))
    assert took < 30, f"a tiny tracked run took {took:.0f}s"


# -------------------------------------------------------------------------------- bad input
BAD = [
    (["--env-id", "CartPol-v1"], "CartPole-v1"),
    (["--env-id", "Pendulum-v1"], "ppo_continuous.py"),
    (["--env-id", "TestImage-v0"], "ppo_atari.py"),
    (["--env-id", "BreakoutNoFrameskip-v4"], "ppo_atari.py"),
    (["--num-minibatches", "3"], "--num-minibatches 3"),
    (["--num-envs", "0"], "--num-envs is 0"),
    (["--num-steps", "-5"], "--num-steps is -5"),
    (["--total-timesteps", "0"], "--total-timesteps is 0"),
    (["--gamma", "1.5"], "--gamma is 1.5"),
    (["--gae-lambda", "-0.1"], "--gae-lambda is -0.1"),
    (["--learning-rate", "0"], "--learning-rate is 0"),
    (["--resume", "nowhere.pt"], "nowhere.pt does not exist"),
    (["--eval-checkpoint", "nowhere.pt"], "nowhere.pt does not exist"),
]


@pytest.mark.parametrize("argv,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_clear_line(argv, expected, capsys):
    assert_bad_input(ppo.main, argv, expected, capsys)
    assert not os.path.exists("runs")  # nothing started


def test_bad_input_from_the_command_line_has_no_traceback():
    out = run_script(SCRIPT, "--env-id", "Pendulum-v1")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "ppo_continuous.py" in out.stderr
    out = run_script(SCRIPT, "--num-envs", "abc")  # tyro's own message for a malformed value
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_corrupt_and_mismatched_checkpoints(in_tmp_dir, capsys):
    with open("garbage.pt", "wb") as f:
        f.write(b"not a checkpoint at all")
    assert ppo.main(["--resume", "garbage.pt"]) == 2
    assert "cannot be read" in capsys.readouterr().err

    ppo.train(tiny(run_name="src", checkpoint_every=1, save_model=True))
    ckpt = "runs/src/checkpoint.pt"
    assert ppo.main(["--resume", ckpt, "--env-id", "Acrobot-v1"]) == 2
    assert "--env-id CartPole-v1" in capsys.readouterr().err
    assert ppo.main(["--resume", "runs/src/agent.pt"]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    assert ppo.main(["--eval-checkpoint", "garbage.pt"]) == 2
    assert "cannot be read" in capsys.readouterr().err

    other = torch.load(ckpt, weights_only=False)
    other["script"] = "ppo_atari"
    torch.save(other, "other.pt")
    assert ppo.main(["--resume", "other.pt"]) == 2
    assert "ppo_atari.py" in capsys.readouterr().err

    wrong = torch.load(ckpt, weights_only=False)
    wrong["model"] = {k: torch.zeros(3) for k in wrong["model"]}
    torch.save(wrong, "wrong.pt")
    assert ppo.main(["--resume", "wrong.pt"]) == 2
    assert "does not fit this network" in capsys.readouterr().err


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(in_tmp_dir, capsys):
    # TestNaN-v0 returns NaN rewards after 3000 steps: the first updates are fine, a later one is not.
    code = ppo.main(["--env-id", "TestNaN-v0", "--total-timesteps", "20480", "--num-envs", "1", "--num-steps", "1024",
                     "--checkpoint-every", "1", "--run-name", "nan", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert "loss became nan" in err and "--learning-rate" in err
    ckpt = torch.load("runs/nan/checkpoint.pt", weights_only=False)
    assert ckpt["iteration"] >= 2 and f"(update {ckpt['iteration'] + 1})" in err
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_tyro_parses_defaults_from_the_issue():
    args = tyro.cli(ppo.Args, args=[])
    assert (args.env_id, args.total_timesteps, args.learning_rate, args.num_envs, args.num_steps) == \
        ("CartPole-v1", 500_000, 2.5e-4, 4, 128)
    assert (args.gamma, args.gae_lambda, args.num_minibatches, args.update_epochs, args.clip_coef) == \
        (0.99, 0.95, 4, 4, 0.2)
    assert (args.ent_coef, args.vf_coef, args.max_grad_norm, args.target_kl, args.seed) == (0.01, 0.5, 0.5, None, 1)
    assert args.norm_adv and args.clip_vloss and args.anneal_lr
    assert (args.batch_size, args.minibatch_size, args.num_iterations) == (512, 128, 976)


def test_target_kl_stops_epochs_early():
    result = ppo.train(tiny(target_kl=1e-9, learning_rate=1e-2))
    assert result["global_step"] == 2048  # runs, and the early stop path is exercised


# --------------------------------------------------------------------------------- learning
def test_learns_cartpole_within_200k_steps():
    # The default configuration (500k-step schedule), watched for its first 200k steps.
    result = ppo.train(ppo.Args(progress=False, run_name="learn"), stop_at_step=200_000)
    assert result["global_step"] <= 200_000 + 512
    returns = np.array(result["episodes"]["returns"])
    best = np.convolve(returns, np.ones(20) / 20, mode="valid").max()
    assert best >= 450, f"best mean of 20 consecutive episodes in 200k steps: {best:.1f}"


def test_health_warnings_are_one_line_per_kind():
    class Sink:
        def __init__(self):
            self.lines = []

        def warn(self, message):
            self.lines.append(message)

    sink = Sink()
    health = ppo.Health(sink, target_kl=0.01)
    good = {"losses/approx_kl": 0.005, "losses/explained_variance": 0.9, "losses/ess": 0.95}
    bad = {"losses/approx_kl": 0.5, "losses/explained_variance": -0.5, "losses/ess": 0.2}
    for step in range(30):
        health.check(good, step, late=True)
    assert sink.lines == []
    for step in range(30):
        health.check(bad, step, late=True)
    assert len(sink.lines) == 3
    assert any("approx KL 0.500" in x for x in sink.lines)
    assert any("explained variance" in x for x in sink.lines)
    assert any("effective sample size" in x for x in sink.lines)
    # Early in training a poor critic is expected; flat returns make explained variance meaningless.
    quiet = Sink()
    for step in range(30):
        ppo.Health(quiet, None).check({**good, "losses/explained_variance": -1.0}, step, late=False)
        ppo.Health(quiet, None).check({**good, "losses/explained_variance": -1.0}, step, late=True, returns_vary=False)
    assert quiet.lines == []


# ------------------------------------------------------------------------------ make_env, the one place for a wrapper
def test_a_wrapper_added_in_make_env_applies_to_every_training_env(monkeypatch, in_tmp_dir):
    # CartPole's native vector env bypasses make_env: it must step aside once make_env adds a wrapper.
    steps = []

    class Counting(gymnasium.Wrapper):
        def step(self, action):
            steps.append(action)
            return self.env.step(action)

    make_env = ppo.make_env
    monkeypatch.setattr(ppo, "make_env", lambda *a, **kw: (lambda: Counting(make_env(*a, **kw)())))
    result = ppo.train(tiny())
    # Every step of the run went through the wrapper, but the steps that only reset an ended episode.
    assert result["global_step"] - len(result["episodes"]["returns"]) <= len(steps) <= result["global_step"]


def test_arguments_added_to_gym_make_in_make_env_apply_to_every_training_env(monkeypatch, in_tmp_dir):
    # The same wrappers as gym.make(env_id) gives, but another time limit: the native vector env, which
    # would keep CartPole's 500 steps, must step aside as well.
    monkeypatch.setattr(ppo, "make_env", lambda env_id, idx, video_dir=None: (
        lambda: gymnasium.make(env_id, max_episode_steps=5)))
    result = ppo.train(tiny())
    assert result["episodes"]["lengths"] and max(result["episodes"]["lengths"]) <= 5


def test_cartpole_as_it_comes_steps_in_its_numpy_native_vector_env():
    envs = ppo.make_envs(ppo.Args(), 4)
    assert type(envs.unwrapped).__name__ == "CartPoleVectorEnv"  # several times faster than 4 envs one by one
    envs.close()
