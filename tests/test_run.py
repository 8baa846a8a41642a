"""What running an experiment needs beyond PPO itself, on every script: your own env, signals from a
cluster, resume that refuses to change the run, logs that continue, evaluation, the closing line."""

import glob
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

from helpers import ROOT, TINY, assert_bad_input, run_script, same_params, tiny_args, tiny_argv

SCRIPTS = list(TINY)


@pytest.fixture(params=SCRIPTS)
def ppo(request):
    return importlib.import_module(request.param)


def readme_section(heading: str) -> str:
    """A section of README.md, from its heading to the next one of the same level."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end > 0 else None]


def code_block(section: str, language: str) -> str:
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


OWN_ENV = readme_section("## Train your own environment")


# ----------------------------------------------------------------------------------------------------
# Your own environment: --env-id module:Env-v0
# ----------------------------------------------------------------------------------------------------
def test_the_readme_example_env_trains_from_the_command_line(in_tmp_dir):
    # The README's own example: the file it shows, and the command it gives (shortened).
    module = re.search(r"`(\w+)\.py`", OWN_ENV).group(1)
    (in_tmp_dir / f"{module}.py").write_text(code_block(OWN_ENV, "python"))
    command = code_block(OWN_ENV, "bash").split()
    assert command[:2] == ["python", "ppo_discrete.py"] and f"{module}:" in " ".join(command)
    out = run_script("ppo_discrete.py", *command[2:], "--total-timesteps", "2048", "--run-name", "own", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert os.path.exists("runs/own/summary.json")


def test_the_readme_example_env_is_learned():
    # The command as the README gives it: the corridor is walked to its end (the best return is 0.94).
    code = code_block(OWN_ENV, "python")
    namespace = {}
    exec(compile(code.replace('gym.register("Corridor-v0"', 'gym.register("ReadmeCorridor-v0"'), "corridor", "exec"),
         namespace)
    import ppo_discrete

    budget = int(code_block(OWN_ENV, "bash").split("--total-timesteps")[1].split()[0])
    result = ppo_discrete.train(ppo_discrete.Args(env_id="ReadmeCorridor-v0", total_timesteps=budget, progress=False,
                                                  run_name="corridor"))
    assert np.mean(result["episodes"]["returns"][-20:]) > 0.9


def test_atari_accepts_a_module_that_registers_an_ale_game(in_tmp_dir):
    (in_tmp_dir / "mygames.py").write_text(
        'import gymnasium as gym\n'
        'gym.register("SlowBreakout-v0", entry_point="ale_py.env:AtariEnv",\n'
        '             kwargs=dict(game="breakout", obs_type="rgb", frameskip=1, repeat_action_probability=0.0))\n')
    out = run_script("ppo_atari.py", *tiny_argv(importlib.import_module("ppo_atari"), env_id="mygames:SlowBreakout-v0"))
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("module, expected", [
    ("nosuchmodule", "the module nosuchmodule does not import (ModuleNotFoundError"),
    ("emptymodule", "importing emptymodule did not register MyEnv-v0; it registers no env"),
    ("othermodule", "importing othermodule did not register MyEnv-v0; it registers OtherEnv-v0"),
])
def test_a_module_that_does_not_register_the_env_is_one_clear_line(ppo, module, expected, in_tmp_dir, capsys):
    (in_tmp_dir / "emptymodule.py").write_text("x = 1\n")
    (in_tmp_dir / "othermodule.py").write_text(
        "import gymnasium as gym\n\nclass Other(gym.Env):\n    pass\n\n"
        "if 'OtherEnv-v0' not in gym.registry:\n    gym.register('OtherEnv-v0', entry_point=Other)\n")
    assert_bad_input(ppo.main, ["--env-id", f"{module}:MyEnv-v0"], expected, capsys)


# ----------------------------------------------------------------------------------------------------
# SIGTERM (kill, SLURM preemption, torchrun stopping the ranks) and SIGKILL
# ----------------------------------------------------------------------------------------------------
def start_and_signal(argv: list[str], signum: int, wait_for: str) -> tuple[int, str]:
    """Start `ppo_discrete.py argv`, send signum once a file matching wait_for exists, and wait for the end."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ppo_discrete.py"), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not glob.glob(wait_for) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_sigterm_writes_the_checkpoint_and_the_results_and_resumes_exactly(in_tmp_dir):
    common = ["--total-timesteps", "40960", "--num-steps", "128", "--save-model", "--no-progress"]
    assert run_script("ppo_discrete.py", *common, "--run-name", "straight").returncode == 0
    code, err = start_and_signal([*common, "--run-name", "cut"], signal.SIGTERM, "runs/cut/events.out.tfevents.*")
    assert code == 128 + signal.SIGTERM, err
    ckpt = torch.load("runs/cut/checkpoint.pt", weights_only=False)
    assert 0 < ckpt["global_step"] < 40960, "the signal should land mid-run; raise --total-timesteps"
    assert os.path.exists("runs/cut/episodes.csv") and os.path.exists("runs/cut/summary.json")
    last = err.strip().splitlines()[-1]
    assert last == "checkpoint written; continue with: python ppo_discrete.py --resume runs/cut/checkpoint.pt", err
    assert "stopped by SIGTERM" in err
    out = run_script("ppo_discrete.py", "--resume", "runs/cut/checkpoint.pt")
    assert out.returncode == 0, out.stderr
    straight = torch.load("runs/straight/agent.pt", weights_only=True)["model"]
    assert same_params(straight, torch.load("runs/cut/agent.pt", weights_only=True)["model"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_quits_at_once_with_the_signal_s_status_and_the_results(in_tmp_dir, signum):
    # One update of 400,000 minibatch steps (minutes long on any machine): the second signal, sent once
    # the first one is acknowledged, interrupts the update instead of waiting for its end.
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ppo_discrete.py"), "--update-epochs", "100000",
                             "--no-progress", "--run-name", "twice"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not glob.glob("runs/twice/events.out.tfevents.*") and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the handlers are set just after the log folder is made
    proc.send_signal(signum)
    seen = []
    while not any("again quits at once" in line for line in seen):
        line = proc.stderr.readline()
        assert line, "".join(seen)[-3000:]
        seen.append(line)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "interrupted" in err, err[-3000:]
    assert json.load(open("runs/twice/summary.json"))["finished"] is False


def test_ctrl_c_to_the_whole_process_group_with_async_envs_still_checkpoints(in_tmp_dir):
    # A terminal's Ctrl-C reaches the env processes too: they leave it to the training process.
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ppo_discrete.py"), "--async-envs", "--env-id",
                             "Acrobot-v1", "--total-timesteps", "400000", "--num-steps", "64", "--no-progress",
                             "--run-name", "group"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not glob.glob("runs/group/events.out.tfevents.*") and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert 0 < torch.load("runs/group/checkpoint.pt", weights_only=False)["global_step"] < 400000
    assert "continue with: python ppo_discrete.py --resume runs/group/checkpoint.pt" in err


def test_a_checkpoint_every_few_minutes_by_default(ppo, in_tmp_dir, monkeypatch):
    assert ppo.Args().checkpoint_minutes == 10.0
    clock = [1000.0]
    monkeypatch.setattr(ppo.time, "time", lambda: clock[0])
    gae = ppo.compute_gae

    def eleven_minutes_per_update(*a, **kw):
        clock[0] += 11 * 60
        return gae(*a, **kw)

    monkeypatch.setattr(ppo, "compute_gae", eleven_minutes_per_update)
    args = tiny_args(ppo, total_timesteps=3 * tiny_args(ppo).batch_size)
    ppo.train(args, stop_at_step=2 * args.batch_size)
    assert torch.load("runs/tiny/checkpoint.pt", weights_only=False)["iteration"] == 2
    ppo.train(tiny_args(ppo, run_name="off", checkpoint_minutes=0))
    assert not os.path.exists("runs/off/checkpoint.pt")


# ----------------------------------------------------------------------------------------------------
# Resume continues the run as it started
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(ppo, in_tmp_dir):
    ppo.train(tiny_args(ppo, checkpoint_every=1, total_timesteps=4 * tiny_args(ppo).batch_size),
              stop_at_step=2 * tiny_args(ppo).batch_size)
    return "runs/tiny/checkpoint.pt"


CHANGES = [("--num-steps", "16", "--num-steps"), ("--gamma", "0.5", "--gamma"), ("--learning-rate", "0.1", "--learning-rate"),
           ("--seed", "7", "--seed"), ("--no-anneal-lr", None, "--anneal-lr"), ("--update-epochs", "3", "--update-epochs")]


@pytest.mark.parametrize("option, value, named", CHANGES, ids=[c[0] for c in CHANGES])
def test_resume_refuses_an_option_that_changes_the_run(ppo, checkpoint, option, value, named, capsys):
    argv = ["--resume", checkpoint, option] + ([value] if value else [])
    assert_bad_input(ppo.main, argv, f"was trained with {named} ", capsys)


def test_resume_allows_what_only_watches_the_run_and_a_longer_budget(ppo, checkpoint, capsys):
    total = 6 * tiny_args(ppo).batch_size
    assert ppo.main(["--resume", checkpoint, "--no-progress", "--checkpoint-every", "2", "--checkpoint-minutes", "5",
                     "--total-timesteps", str(total), "--save-model"]) == 0
    assert torch.load(checkpoint, weights_only=False)["global_step"] == total
    assert os.path.exists(os.path.join(os.path.dirname(checkpoint), "agent.pt"))
    assert ppo.main(["--resume", checkpoint, "--total-timesteps", str(2 * tiny_args(ppo).batch_size)]) == 2
    assert "less than the" in capsys.readouterr().err


def test_resuming_a_continuous_run_with_another_gamma_is_refused(in_tmp_dir, capsys):
    # The reward scaler runs on the gamma it started with; GAE would use the new one.
    import ppo_continuous

    ppo_continuous.train(tiny_args(ppo_continuous, checkpoint_every=1))
    capsys.readouterr()
    assert_bad_input(ppo_continuous.main, ["--resume", "runs/tiny/checkpoint.pt", "--gamma", "0.9"],
                     "was trained with --gamma 0.99, not 0.9", capsys)


# ----------------------------------------------------------------------------------------------------
# TensorBoard and wandb go on where the checkpoint was
# ----------------------------------------------------------------------------------------------------
def scalar_steps(run_dir: str, tag: str = "losses/value_loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(run_dir)
    ea.Reload()
    return [e.step for e in ea.Scalars(tag)]


def test_tensorboard_after_a_crash_and_a_resume_has_every_update_once(ppo, in_tmp_dir):
    args = tiny_args(ppo, total_timesteps=8 * tiny_args(ppo).batch_size, checkpoint_every=3)
    steps = [args.batch_size * i for i in range(1, 9)]
    # A crash after update 5: the checkpoint of update 3 is the last one, and updates 4-5 were logged.
    ppo.train(args, stop_at_step=5 * args.batch_size)
    assert scalar_steps("runs/tiny") == steps[:5]
    ppo.train(tiny_args(ppo, total_timesteps=args.total_timesteps, checkpoint_every=3,
                        resume="runs/tiny/checkpoint.pt"))
    assert scalar_steps("runs/tiny") == steps  # no gap, no step twice


def test_a_checkpoint_flushes_the_buffered_scalars(in_tmp_dir):
    # Killed without warning right after a checkpoint: everything logged up to it is on disk.
    code, _ = start_and_signal(["--total-timesteps", "400000", "--checkpoint-every", "20", "--no-progress",
                                "--run-name", "killed"], signal.SIGKILL, "runs/killed/checkpoint.pt")
    assert code == -signal.SIGKILL
    ckpt = torch.load("runs/killed/checkpoint.pt", weights_only=False)
    logged = scalar_steps("runs/killed")
    assert ckpt["iteration"] >= 20 and logged[:ckpt["iteration"]] == [512 * i for i in range(1, ckpt["iteration"] + 1)]


def test_track_resumes_the_same_wandb_run(in_tmp_dir):
    import ppo_discrete

    args = tiny_args(ppo_discrete, track=True, checkpoint_every=1)
    ppo_discrete.train(args)
    ckpt = torch.load("runs/tiny/checkpoint.pt", weights_only=False)
    assert ckpt["wandb_id"]
    ppo_discrete.train(tiny_args(ppo_discrete, track=True, total_timesteps=2 * args.total_timesteps,
                                 resume="runs/tiny/checkpoint.pt"))
    runs = sorted(glob.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and all(f"-{ckpt['wandb_id']}" in r for r in runs)  # "-1" is added within one second


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------
def test_evaluation_plays_on_seeds_apart_from_training_and_can_be_deterministic(ppo, in_tmp_dir, monkeypatch, capsys):
    ppo.train(tiny_args(ppo, save_model=True, seed=3))
    seeds, modes = [], []
    reset, act = gym.wrappers.vector.RecordEpisodeStatistics.reset, ppo.Agent.act
    monkeypatch.setattr(gym.wrappers.vector.RecordEpisodeStatistics, "reset",
                        lambda self, **kw: seeds.append(kw.get("seed")) or reset(self, **kw))
    monkeypatch.setattr(ppo.Agent, "act", lambda self, obs, deterministic=False: modes.append(deterministic) or
                        act(self, obs, deterministic))
    assert ppo.main(["--eval-checkpoint", "runs/tiny/agent.pt", "--eval-episodes", "1"]) == 0
    out = capsys.readouterr().out
    assert seeds == [1_000_000_003] and set(modes) == {False}
    assert "actions sampled from the policy, env seed 1000000003" in out
    seeds.clear(), modes.clear()
    assert ppo.main(["--eval-checkpoint", "runs/tiny/agent.pt", "--eval-episodes", "1", "--eval-deterministic",
                     "--eval-seed", "5"]) == 0
    assert seeds == [5] and set(modes) == {True}
    assert "deterministic actions, env seed 5" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Checks before anything starts
# ----------------------------------------------------------------------------------------------------
def test_a_vector_env_that_resets_in_the_same_step_is_refused(ppo, in_tmp_dir, monkeypatch, capsys):
    make_envs = ppo.make_envs

    def same_step(args, num_envs, video_dir=None):
        envs = make_envs(args, num_envs, video_dir)
        envs.unwrapped.metadata = {**envs.unwrapped.metadata, "autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}
        return envs

    monkeypatch.setattr(ppo, "make_envs", same_step)
    assert_bad_input(ppo.main, tiny_argv(ppo), "handles only gymnasium's default, AutoresetMode.NEXT_STEP", capsys)


@pytest.mark.parametrize("option, value", [("--ent-coef", "nan"), ("--vf-coef", "nan"), ("--clip-coef", "inf"),
                                           ("--learning-rate", "-inf"), ("--target-kl", "nan"), ("--gamma", "nan")])
def test_nan_and_infinite_floats_are_refused(ppo, option, value, capsys):
    assert_bad_input(ppo.main, [option, value], f"{option} is {float(value)}; it must be a finite number", capsys)


def test_an_env_whose_package_is_missing_is_one_line(in_tmp_dir, capsys):
    import ppo_discrete

    class NeedsBox2D(gym.Env):
        def __init__(self):
            raise gym.error.DependencyNotInstalled('Box2D is not installed, run `pip install "gymnasium[box2d]"`')

    if "TestNeedsBox2D-v0" not in gym.registry:
        gym.register("TestNeedsBox2D-v0", entry_point=NeedsBox2D)
    assert_bad_input(ppo_discrete.main, ["--env-id", "TestNeedsBox2D-v0"], 'pip install "gymnasium[box2d]"', capsys)


@pytest.mark.parametrize("script, env_id", [("ppo_discrete", "LunarLander-v3"), ("ppo_continuous", "BipedalWalker-v3")])
def test_box2d_envs_run_out_of_the_box(script, env_id, in_tmp_dir):
    ppo = importlib.import_module(script)
    result = ppo.train(tiny_args(ppo, env_id=env_id))
    assert result["global_step"] == tiny_args(ppo).total_timesteps


# ----------------------------------------------------------------------------------------------------
# The end of a run says where everything is
# ----------------------------------------------------------------------------------------------------
def test_a_run_ends_with_one_line_saying_what_it_did_and_where_its_files_are(ppo, in_tmp_dir):
    out = run_script(f"{ppo.SCRIPT}.py", *tiny_argv(ppo))
    assert out.returncode == 0, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    total = tiny_args(ppo).total_timesteps
    assert last.startswith(f"finished: {total:,} of {total:,} steps in "), last
    assert "steps/s), " in last and "files in runs/tiny (tensorboard --logdir runs)" in last
