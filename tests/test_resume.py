"""Stopping and going on, on every script: checkpoints, exact resume, what a resume may and may not change, Ctrl-C and
SIGTERM, a crash in the env, an env at fault, a full disk, and the logs across all of it."""

import glob
import importlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import (
    ROOT,
    FaultyEnv,
    assert_bad_input,
    load,
    logged,
    run_script,
    same_params,
    start_script,
    tiny,
    tiny_argv,
)


def checkpointed(ppo, updates=2, of=4, **kw) -> str:
    """A tiny run of `of` updates stopped after `updates`, with a checkpoint after each; the checkpoint's path."""
    batch = tiny(ppo).batch_size
    ppo.train(tiny(ppo, checkpoint_every=1, total_timesteps=of * batch, **kw), stop_at_step=updates * batch)
    return "runs/tiny/checkpoint.pt"


def wait_for(pattern: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not glob.glob(pattern) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)


# ----------------------------------------------------------------------------------------------------
# Exact resume, and what a resume may change
# ----------------------------------------------------------------------------------------------------
def test_a_resumed_run_ends_exactly_as_an_uninterrupted_one(ppo):
    # The checkpoint falls mid-episode (in ppo_atari.py mid-game): the env's state comes back with the random
    # generators (the emulator's, which drives sticky actions, and the no-ops').
    total = 4 * tiny(ppo).batch_size
    straight = ppo.train(tiny(ppo, run_name="straight", total_timesteps=total))
    path = checkpointed(ppo)
    assert load(path)["iteration"] == 2
    resumed = ppo.train(tiny(ppo, total_timesteps=total, resume=path))
    assert resumed["global_step"] == total and straight["episodes"]["returns"] == resumed["episodes"]["returns"]
    assert same_params(straight["agent"].state_dict(), resumed["agent"].state_dict())


@pytest.mark.parametrize("form", ["--resume PATH", "--resume=PATH"])
def test_resume_takes_the_checkpoint_s_options_in_either_form(ppo, form, monkeypatch):
    path = checkpointed(ppo, learning_rate=1e-3)
    seen = []
    monkeypatch.setattr(ppo, "train", lambda args: seen.append(args) or {"interrupted": False})
    assert ppo.main((["--resume", path] if form == "--resume PATH" else [f"--resume={path}"]) + ["--seed", "7"]) == 0
    assert seen[0].learning_rate == 1e-3 and seen[0].total_timesteps == 4 * tiny(ppo).batch_size  # the checkpoint's
    assert seen[0].seed == 7  # what was given again


CHANGES = [
    ("--num-steps", "16", "--num-steps"),
    ("--gamma", "0.5", "--gamma"),
    ("--learning-rate", "0.1", "--learning-rate"),
    ("--seed", "7", "--seed"),
    ("--no-anneal-lr", None, "--anneal-lr"),
    ("--update-epochs", "3", "--update-epochs"),
]


@pytest.mark.parametrize("option, value, named", CHANGES, ids=[c[0] for c in CHANGES])
def test_resume_refuses_an_option_that_changes_the_run(ppo, option, value, named, capsys):
    path = checkpointed(ppo)
    assert_bad_input(
        ppo.main, ["--resume", path, option] + ([value] if value else []), f"was trained with {named} ", capsys
    )


def test_resume_allows_what_only_watches_the_run_and_a_longer_budget(ppo, capsys):
    path, batch = checkpointed(ppo), tiny(ppo).batch_size
    assert_bad_input(ppo.main, ["--resume", path, "--total-timesteps", str(batch)], "is less than the", capsys)
    assert (
        ppo.main(
            [
                "--resume",
                path,
                "--no-progress",
                "--checkpoint-every",
                "2",
                "--checkpoint-minutes",
                "5",
                "--total-timesteps",
                str(6 * batch),
                "--save-model",
            ]
        )
        == 0
    )
    assert load(path)["global_step"] == 6 * batch and os.path.exists("runs/tiny/agent.pt")


def test_files_that_are_not_this_script_s_checkpoints_are_refused(ppo, capsys):
    path = checkpointed(ppo, save_model=True)
    with open("garbage.pt", "wb") as f:
        f.write(b"not a checkpoint at all")
    assert_bad_input(ppo.main, ["--resume", "garbage.pt"], "cannot be read as a file of", capsys)
    assert_bad_input(ppo.main, ["--eval-checkpoint", "garbage.pt"], "cannot be read as a file of", capsys)
    torch.save({"model": {}}, "no_args.pt")
    assert_bad_input(ppo.main, ["--resume", "no_args.pt"], "is not a file written by", capsys)
    ppo.train(tiny(ppo, run_name="agent", save_model=True))
    assert_bad_input(ppo.main, ["--resume", "runs/agent/agent.pt"], "is a saved agent, not a checkpoint", capsys)
    for key, value, expected in (
        ("family", "other", "holds a other agent"),
        ("format", 2, "another version"),
        ("model", {"x": torch.zeros(3)}, "does not fit this network"),
    ):
        torch.save({**load(path), key: value}, f"{key}.pt")
        assert_bad_input(ppo.main, ["--resume", f"{key}.pt"], expected, capsys)


def test_envs_that_cannot_be_saved_resume_with_new_episodes(ppo, monkeypatch):
    monkeypatch.setattr(ppo, "env_state", lambda env: (_ for _ in ()).throw(TypeError("cannot pickle a handle")))
    kw = dict(env_id="Acrobot-v1") if ppo.__name__ == "ppo_discrete" else {}  # CartPole's own vector env pickles whole
    path = checkpointed(ppo, **kw)
    resumed = ppo.train(tiny(ppo, total_timesteps=4 * tiny(ppo).batch_size, resume=path, **kw))
    assert resumed["global_step"] == 4 * tiny(ppo).batch_size
    if ppo.__name__ == "ppo_continuous":  # the normalization goes on from the saved statistics
        assert resumed["env_stats"]["obs_rms"]["count"] > load(path)["env_stats"]["obs_rms"]["count"] > 1
        assert len(ppo.evaluate(path, episodes=1)[0]) == 1  # evaluation reads them from the checkpoint too


def test_async_envs_play_the_same_episodes_and_resume_exactly(ppo):
    # Each env in a process of its own gives the same episodes as all in this one. A checkpoint saves each env in its
    # own process; here it falls right after an episode's end (10-step episodes, 2 updates of 5 steps), so the resumed
    # envs must reset on their first step, as the vector env would have.
    env_id = {
        "ppo_discrete": "TestClock-v0",
        "ppo_continuous": "TestClockContinuous-v0",
        "ppo_atari": "TestBreakoutCut-v0",
    }[ppo.__name__]
    kw = dict(env_id=env_id, num_envs=2, num_steps=5, total_timesteps=40, num_minibatches=2)
    inline = ppo.train(tiny(ppo, run_name="inline", async_envs=False, **kw))
    straight = ppo.train(tiny(ppo, run_name="async", async_envs=True, **kw))
    assert same_params(inline["agent"].state_dict(), straight["agent"].state_dict())
    assert inline["episodes"]["returns"] == straight["episodes"]["returns"]
    ppo.train(tiny(ppo, run_name="cut", async_envs=True, checkpoint_every=2, **kw), stop_at_step=20)
    shutil.copytree("runs/cut", "cut")
    for async_envs in (True, False):  # how the envs are stepped does not change the run
        shutil.rmtree("runs/cut")
        shutil.copytree("cut", "runs/cut")  # the stopped run again: a finished one is never resumed
        resumed = ppo.train(tiny(ppo, run_name="cut", async_envs=async_envs, resume="runs/cut/checkpoint.pt", **kw))
        assert same_params(straight["agent"].state_dict(), resumed["agent"].state_dict())
        assert straight["episodes"]["returns"] == resumed["episodes"]["returns"]


def test_async_envs_by_default_only_with_a_core_per_env_to_spare():
    import ppo_atari
    import ppo_continuous
    import ppo_discrete

    assert ppo_atari.Args().async_envs == (len(os.sched_getaffinity(0)) > 8) and ppo_atari.Args().num_envs == 8
    assert not ppo_discrete.Args().async_envs and not ppo_continuous.Args().async_envs
    code = (
        "import os, sys; os.sched_getaffinity = lambda pid: set(range(16)); sys.path.insert(0, sys.argv[1]); "
        "import ppo_atari; print(ppo_atari.Args().async_envs)"
    )
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-1] == "True", out.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------
# Checkpoints on a schedule, and the logs across a resume
# ----------------------------------------------------------------------------------------------------
def test_a_checkpoint_every_few_minutes_by_default(ppo, monkeypatch):
    assert ppo.Args().checkpoint_minutes == 10.0
    clock, gae = [1000.0], ppo.compute_gae
    monkeypatch.setattr(ppo.time, "time", lambda: clock[0])
    monkeypatch.setattr(ppo, "compute_gae", lambda *a, **kw: clock.__setitem__(0, clock[0] + 660) or gae(*a, **kw))
    args = tiny(ppo, total_timesteps=3 * tiny(ppo).batch_size)
    ppo.train(args, stop_at_step=2 * args.batch_size)  # 11 minutes per update
    assert load("runs/tiny/checkpoint.pt")["iteration"] == 2
    ppo.train(tiny(ppo, run_name="off", checkpoint_minutes=0))
    assert not os.path.exists("runs/off/checkpoint.pt")


def test_tensorboard_after_a_crash_and_a_resume_has_every_update_once(ppo):
    args = tiny(ppo, total_timesteps=8 * tiny(ppo).batch_size, checkpoint_every=3)
    steps = [args.batch_size * i for i in range(1, 9)]
    ppo.train(args, stop_at_step=5 * args.batch_size)  # stopped after update 5; the last checkpoint was update 3's
    assert logged("runs/tiny", steps=True) == steps[:5]
    ppo.train(tiny(ppo, total_timesteps=args.total_timesteps, checkpoint_every=3, resume="runs/tiny/checkpoint.pt"))
    assert logged("runs/tiny", steps=True) == steps  # no gap, no step twice


def test_track_resumes_the_same_wandb_run():
    import ppo_discrete

    path = checkpointed(ppo_discrete, track=True)
    wandb_id = load(path)["wandb_id"]
    ppo_discrete.train(tiny(ppo_discrete, track=True, total_timesteps=4 * 128, resume=path))
    runs = sorted(glob.glob("wandb/offline-run-*"))
    assert wandb_id and len(runs) == 2 and all(f"-{wandb_id}" in r for r in runs)


# ----------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM
# ----------------------------------------------------------------------------------------------------
COMMON = ["--total-timesteps", "40960", "--num-steps", "128", "--save-model", "--no-progress"]


def test_sigterm_writes_the_checkpoint_and_the_results_and_the_run_resumes_exactly(in_tmp_dir):
    assert run_script("ppo_discrete.py", *COMMON, "--run-name", "straight").returncode == 0
    proc = start_script("ppo_discrete.py", *COMMON, "--run-name", "cut")
    wait_for("runs/cut/events.out.tfevents.*")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert 0 < load("runs/cut/checkpoint.pt")["global_step"] < 40960, "the signal should land mid-run"
    assert os.path.exists("runs/cut/episodes.csv") and not os.path.exists("runs/cut/agent.pt")
    assert json.load(open("runs/cut/summary.json"))["finished"] is False and "stopped by SIGTERM" in err
    assert (
        err.strip().splitlines()[-1]
        == "continue from the last checkpoint with: python ppo_discrete.py --resume runs/cut/checkpoint.pt"
    )
    assert run_script("ppo_discrete.py", "--resume", "runs/cut/checkpoint.pt").returncode == 0
    assert same_params(load("runs/straight/agent.pt")["model"], load("runs/cut/agent.pt")["model"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_quits_at_once_with_the_signal_s_status_and_the_results(in_tmp_dir, signum):
    # One update of 400,000 minibatch steps (minutes long on any machine): the second signal, sent once the first one
    # is acknowledged, interrupts the update instead of waiting for its end.
    proc = start_script("ppo_discrete.py", "--update-epochs", "100000", "--no-progress", "--run-name", "twice")
    wait_for("runs/twice/events.out.tfevents.*")
    proc.send_signal(signum)
    seen = []
    while not any("again quits at once" in line for line in seen):
        line = proc.stderr.readline()
        assert line, "".join(seen)[-3000:]
        seen.append(line)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum and "interrupted" in err, err[-3000:]
    assert json.load(open("runs/twice/summary.json"))["finished"] is False


def test_ctrl_c_to_the_whole_process_group_with_async_envs_still_checkpoints(in_tmp_dir):
    # A terminal's Ctrl-C reaches the env processes too: they leave it to the training process.
    proc = start_script(
        "ppo_discrete.py",
        "--async-envs",
        "--env-id",
        "Acrobot-v1",
        "--total-timesteps",
        "400000",
        "--num-steps",
        "64",
        "--no-progress",
        "--run-name",
        "group",
        start_new_session=True,
    )
    wait_for("runs/group/events.out.tfevents.*")
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert 0 < load("runs/group/checkpoint.pt")["global_step"] < 400000
    assert "checkpoint with: python ppo_discrete.py --resume runs/group/checkpoint.pt" in err


def test_a_signal_in_the_last_update_lets_the_run_finish_and_one_after_it_changes_nothing(ppo, monkeypatch):
    monkeypatch.setattr(ppo, "CATCH_SIGNALS", True)  # as under __main__
    gae, calls, finish = ppo.compute_gae, [], ppo.Run.finish

    def ctrl_c_in_the_last(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return gae(*a, **kw)

    monkeypatch.setattr(ppo, "compute_gae", ctrl_c_in_the_last)
    monkeypatch.setattr(
        ppo.Run, "finish", lambda self, error: signal.raise_signal(signal.SIGTERM) or finish(self, error)
    )
    assert ppo.main(tiny_argv(ppo, total_timesteps=2 * tiny(ppo).batch_size, save_model=True)) == 0
    assert os.path.isfile("runs/tiny/agent.pt") and json.load(open("runs/tiny/summary.json"))["finished"] is True


def test_ctrl_c_in_the_update_that_ends_the_run_early_still_checkpoints(ppo, monkeypatch):
    monkeypatch.setattr(ppo, "CATCH_SIGNALS", True)  # as under __main__
    gae = ppo.compute_gae
    monkeypatch.setattr(ppo, "compute_gae", lambda *a, **kw: signal.raise_signal(signal.SIGINT) or gae(*a, **kw))
    result = ppo.train(tiny(ppo), stop_at_step=tiny(ppo).batch_size)
    assert result["interrupted"] and os.path.isfile("runs/tiny/checkpoint.pt")


def test_a_checkpoint_flushes_the_buffered_scalars(in_tmp_dir):
    # Killed without warning right after a checkpoint: everything logged up to it is on disk.
    proc = start_script(
        "ppo_discrete.py",
        "--total-timesteps",
        "400000",
        "--checkpoint-every",
        "20",
        "--no-progress",
        "--run-name",
        "killed",
    )
    wait_for("runs/killed/checkpoint.pt")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    iteration = load("runs/killed/checkpoint.pt")["iteration"]
    assert iteration >= 20 and logged("runs/killed", steps=True)[:iteration] == [
        512 * i for i in range(1, iteration + 1)
    ]


# ----------------------------------------------------------------------------------------------------
# Faults: the env's, the disk's
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ppo_discrete", "ppo_continuous"])  # Part B's; an Atari env is a ROM, not your code
def test_a_crash_in_the_env_keeps_the_last_completed_update(name, capsys, monkeypatch):
    # TestCrash-v0 raises in its 301st step, in the third rollout of 128 steps: the run keeps updates 1 and 2,
    # says what happened and how to go on, and a resume trains on with new episodes.
    ppo = importlib.import_module(name)
    env_id = "TestCrashContinuous-v0" if ppo.__name__ == "ppo_continuous" else "TestCrash-v0"
    argv = [
        "--env-id",
        env_id,
        "--num-envs",
        "1",
        "--num-steps",
        "128",
        "--num-minibatches",
        "2",
        "--total-timesteps",
        "1280",
        "--run-name",
        "crash",
        "--no-progress",
        "--checkpoint-minutes",
        "0",
    ]
    assert ppo.main(argv) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: the env's own bug" in err and "Traceback" in err  # the env's own traceback, to debug it
    lines = err.strip().splitlines()
    assert lines[-3].startswith("stopped by an error: ") and "of 1,280 steps" in lines[-3]
    assert (
        lines[-2]
        == f"continue from the last checkpoint with: python {ppo.__name__}.py --resume runs/crash/checkpoint.pt"
    )
    assert lines[-1] == "error: training stopped by RuntimeError: the env's own bug (traceback above)"
    ckpt = load("runs/crash/checkpoint.pt")
    assert (ckpt["iteration"], ckpt["global_step"]) == (2, 256) and all(e[0] <= 256 for e in ckpt["episodes"])
    monkeypatch.setattr(FaultyEnv, "after", 10**9, raising=False)  # the env, mended
    assert ppo.main(["--resume", "runs/crash/checkpoint.pt", "--no-progress"]) == 0
    assert json.load(open("runs/crash/summary.json"))["global_step"] == 1280


@pytest.mark.parametrize(
    "fault, expected",
    [
        (
            "Shape",
            "returned an observation of shape (3,) at its step 301, where its observation space is Box(-1.0, 1.0, "
            "(1,), float32)",
        ),
        (
            "Nan",
            "returned a non-finite observation at its step 301, where its observation space is Box(-1.0, 1.0, (1,), ",
        ),
        ("NaN", "returned a reward of nan at its step 3000"),
    ],
)
@pytest.mark.parametrize("name", ["ppo_discrete", "ppo_continuous"])  # Part B's check; an Atari env is a ROM
def test_an_env_at_fault_is_named_with_its_step_its_space_and_what_it_returned(name, fault, expected, capsys):
    ppo = importlib.import_module(name)
    env_id = f"Test{fault}{'Continuous' if ppo.__name__ == 'ppo_continuous' else ''}-v0"
    assert (
        ppo.main(
            [
                "--env-id",
                env_id,
                "--num-envs",
                "1",
                "--num-steps",
                "1024",
                "--num-minibatches",
                "2",
                "--total-timesteps",
                "8192",
                "--run-name",
                "fault",
                "--no-progress",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: env 0 ({env_id}) returned ") and expected in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err) and "learning-rate" not in err[-1]


def test_a_write_that_fails_midway_keeps_the_last_good_file_and_leaves_no_partial_one(ppo):
    # A file size limit of 1,000 bytes stands in for a full disk.
    ppo.write_file("file.pt", {"version": 1, "weights": torch.ones(10)})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(ppo.RunError, match=r"^cannot write file.pt \(File too large\); the last good file there"):
            ppo.write_file("file.pt", {"version": 2, "weights": torch.zeros(10_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert load("file.pt")["version"] == 1 and os.listdir(".") == ["file.pt"]


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_good_checkpoint(in_tmp_dir):
    # A file size limit stands in for a full disk: the first checkpoints (about 150 kB, growing with the list of
    # episodes) pass it, a later one does not. The partial file is removed and the good one kept.
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (155_000, 155_000))

    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "ppo_discrete.py"),
            "--total-timesteps",
            "40960",
            "--checkpoint-every",
            "2",
            "--no-progress",
            "--run-name",
            "full",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write runs/full/") and "(File too large)" in last, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and not glob.glob("runs/full/*.tmp")
    assert load("runs/full/checkpoint.pt")["iteration"] >= 2


def test_a_run_folder_that_becomes_unwritable_stops_the_run_in_one_line(monkeypatch, capsys):
    import ppo_discrete

    gae = ppo_discrete.compute_gae

    def folder_gone(*a, **kw):
        if os.path.isdir("runs/gone"):
            os.rename("runs/gone", "elsewhere")
        return gae(*a, **kw)

    monkeypatch.setattr(ppo_discrete, "compute_gae", folder_gone)
    assert ppo_discrete.main(tiny_argv(ppo_discrete, run_name="gone", checkpoint_every=1)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("error: cannot write ")
        and "runs/gone" in err[-1]
        and "(No such file or directory)" in err[-1]
    ), err
    assert "Traceback" not in "\n".join(err)
