"""Checkpoint, resume and stop details that every script shares, run on each script."""

import importlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict

import gymnasium as gym
import numpy as np
import pytest
import torch

from helpers import ROOT, TINY, register_test_envs, same_params, tiny_args

register_test_envs()


@pytest.fixture(params=list(TINY))
def ppo(request):
    return importlib.import_module(request.param)


tiny = tiny_args


@pytest.mark.parametrize("form", ["--resume PATH", "--resume=PATH"])
def test_resume_takes_the_checkpoints_options_in_either_form(ppo, form, in_tmp_dir, monkeypatch):
    saved = asdict(tiny(ppo, learning_rate=1e-3, total_timesteps=4096))
    torch.save({"script": ppo.SCRIPT, "model": {}, "args": saved}, "ckpt.pt")
    seen = []
    monkeypatch.setattr(ppo, "train", lambda args: seen.append(args) or {"interrupted": False})
    argv = ["--resume", "ckpt.pt"] if form == "--resume PATH" else ["--resume=ckpt.pt"]
    assert ppo.main(argv + ["--seed", "7"]) == 0
    assert seen[0].learning_rate == 1e-3 and seen[0].total_timesteps == 4096  # the checkpoint's
    assert seen[0].seed == 7  # what was given again


def test_a_signal_in_the_last_update_lets_the_run_finish(ppo, in_tmp_dir, monkeypatch):
    gae, calls = ppo.compute_gae, []

    def ctrl_c_in_the_last(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return gae(*a, **kw)

    monkeypatch.setattr(ppo, "compute_gae", ctrl_c_in_the_last)
    args = tiny(ppo, save_model=True)
    args = tiny(ppo, save_model=True, total_timesteps=2 * args.batch_size)
    result = ppo.train(args)
    assert not result["interrupted"] and result["global_step"] == args.total_timesteps
    assert os.path.isfile("runs/tiny/agent.pt")
    assert json.load(open("runs/tiny/summary.json"))["finished"] is True


def test_envs_that_cannot_be_saved_resume_with_new_episodes(ppo, in_tmp_dir, monkeypatch):
    def cannot(env):
        raise TypeError("cannot pickle a handle")

    monkeypatch.setattr(ppo, "env_state", cannot)  # as for envs that hold an open file or a socket
    if ppo.__name__ == "ppo_discrete":
        kw = dict(env_id="Acrobot-v1")  # CartPole's own vector env pickles whole, not env by env
    else:
        kw = {}
    first = ppo.train(tiny(ppo, checkpoint_every=1, **kw))
    path = os.path.join(first["run_dir"], "checkpoint.pt")
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["ranks"][0]["envs"]["envs"] is None
    more = ppo.train(tiny(ppo, total_timesteps=2 * first["global_step"], resume=path, **kw))
    assert more["global_step"] == 2 * first["global_step"]
    if ppo.__name__ == "ppo_continuous":  # the normalization goes on from the saved statistics
        saved = ckpt["env_stats"]["obs_rms"]
        assert more["env_stats"]["obs_rms"]["count"] > saved["count"] > 1
        returns = ppo.evaluate(path, episodes=1)  # evaluation reads them from the checkpoint too
        assert len(returns) == 1


def test_ctrl_c_in_the_last_update_still_writes_a_checkpoint(ppo, in_tmp_dir, monkeypatch):
    gae = ppo.compute_gae

    def gae_then_ctrl_c(*a, **kw):
        signal.raise_signal(signal.SIGINT)  # arrives while the update runs: caught, the update finishes
        return gae(*a, **kw)

    monkeypatch.setattr(ppo, "compute_gae", gae_then_ctrl_c)
    args = tiny(ppo)
    result = ppo.train(args, stop_at_step=args.batch_size)  # stop_at_step ends the run at this same update
    assert result["interrupted"]
    assert os.path.isfile(os.path.join(result["run_dir"], "checkpoint.pt"))


@pytest.mark.parametrize("name", ["ppo_discrete", "ppo_continuous"])
def test_too_few_transitions_for_the_minibatches_is_a_clear_error(name, in_tmp_dir, capsys):
    ppo = importlib.import_module(name)
    # Episodes of one step: every other step only resets the env, so a rollout of 4 holds 2 transitions.
    env = "TestTerminate-v0" if name == "ppo_discrete" else "TestContinuous-v0"
    argv = ["--env-id", env, "--num-envs", "1", "--num-steps", "4", "--num-minibatches", "2",
            "--total-timesteps", "64", "--no-progress"]
    assert ppo.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only 2 transitions" in err[0] and "--num-minibatches 2" in err[0]


def test_async_envs_play_the_same_episodes_and_resume_exactly(ppo, in_tmp_dir):
    # Each env in a process of its own gives the same episodes as all in this one. A checkpoint saves each
    # env in its own process; here it falls right after an episode's end (TestClock-v0 is cut every 10 steps,
    # 2 updates of 5 steps), so the resumed envs must reset on their first step, as the vector env would have.
    env_id = {"ppo_discrete": "TestClock-v0", "ppo_continuous": "TestClockContinuous-v0",
              "ppo_atari": "TestBreakoutCut-v0"}[ppo.__name__]
    kw = dict(env_id=env_id, num_envs=2, num_steps=5, total_timesteps=40, num_minibatches=2)
    inline = ppo.train(tiny(ppo, run_name="inline", async_envs=False, **kw))
    straight = ppo.train(tiny(ppo, run_name="async", async_envs=True, **kw))
    assert same_params(inline["agent"].state_dict(), straight["agent"].state_dict())
    assert inline["episodes"]["returns"] == straight["episodes"]["returns"]
    ppo.train(tiny(ppo, run_name="cut", async_envs=True, checkpoint_every=2, **kw), stop_at_step=20)
    resumed = ppo.train(tiny(ppo, async_envs=True, resume="runs/cut/checkpoint.pt", **kw))
    assert same_params(straight["agent"].state_dict(), resumed["agent"].state_dict())
    assert straight["episodes"]["returns"] == resumed["episodes"]["returns"]
    # ... and the same run may go on in this process: how the envs are stepped does not change the run.
    again = ppo.train(tiny(ppo, run_name="x", async_envs=False, resume="runs/cut/checkpoint.pt", **kw))
    assert same_params(straight["agent"].state_dict(), again["agent"].state_dict())


def test_async_envs_by_default_only_with_a_core_per_env_to_spare():
    # ppo_atari.py's emulators are slow enough to gain from processes of their own, where the machine has
    # more cores than its 8 default envs (not this 2-core one); the cheap envs of the other two never do.
    import ppo_atari
    import ppo_continuous
    import ppo_discrete

    cores = len(os.sched_getaffinity(0))
    assert ppo_atari.Args().async_envs == (cores > 8) and ppo_atari.Args().num_envs == 8
    assert not ppo_discrete.Args().async_envs and not ppo_continuous.Args().async_envs
    code = ("import os, sys; os.sched_getaffinity = lambda pid: set(range(16)); sys.path.insert(0, sys.argv[1]); "
            "import ppo_atari; print(ppo_atari.Args().async_envs)")
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-1] == "True", out.stderr[-2000:]
