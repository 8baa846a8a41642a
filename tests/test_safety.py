"""What a careless or hostile input must never do: overwrite a finished run, share a run folder between two live
processes, promise a file that is not there, let a shared file steer the loader, hang or show a traceback where one
line is promised, or keep a test session from stopping."""

import fcntl
import glob
import json
import os
import resource
import signal
import subprocess
import sys
import time

import torch

from helpers import ROOT, assert_bad_input, load, run_script, start_script, tiny, tiny_argv


def stopped_run(ppo, name="a", updates=2):
    """A run stopped after `updates` of its 4 updates, with a checkpoint: it has not finished."""
    args = tiny(ppo, run_name=name, checkpoint_every=1, save_model=True)
    ppo.train(args, stop_at_step=updates * args.batch_size)
    return f"runs/{name}/checkpoint.pt"


def files_of(folder: str) -> dict:
    return {path: open(path, "rb").read() for path in sorted(glob.glob(f"{folder}/*")) if os.path.isfile(path)}


# ----------------------------------------------------------------------------------------------------
# A finished run is never written again; a resume goes on in its own folder
# ----------------------------------------------------------------------------------------------------
def test_a_finished_run_is_never_resumed_and_its_results_stay(capsys):
    import ppo_discrete

    checkpoint = stopped_run(ppo_discrete)
    assert ppo_discrete.main(["--resume", checkpoint, "--no-progress"]) == 0  # resumed to its end
    assert json.load(open("runs/a/summary.json"))["finished"] is True
    before = files_of("runs/a")
    for argv in ([], ["--total-timesteps", "2048"], ["--run-name", "b"]):
        assert_bad_input(ppo_discrete.main, ["--resume", checkpoint, *argv], "error: ", capsys)
    assert files_of("runs/a") == before and not os.path.exists("runs/b")
    capsys.readouterr()
    ppo_discrete.main(["--resume", checkpoint, "--no-progress"])
    assert "runs/a has finished, and its results are never written again" in capsys.readouterr().err


def test_run_name_beside_resume_is_refused_not_ignored(capsys):
    import ppo_discrete

    checkpoint = stopped_run(ppo_discrete)
    before = files_of("runs/a")
    expected = "--run-name b: a resumed run goes on in its own folder, runs/a; drop --run-name"
    assert_bad_input(ppo_discrete.main, ["--resume", checkpoint, "--run-name", "b"], expected, capsys)
    assert files_of("runs/a") == before and not os.path.exists("runs/b")


# ----------------------------------------------------------------------------------------------------
# A run folder belongs to one live process
# ----------------------------------------------------------------------------------------------------
def test_a_second_process_is_refused_while_the_first_holds_the_folder(capsys):
    import ppo_discrete

    checkpoint = stopped_run(ppo_discrete)
    before = files_of("runs/a")
    holder = os.open("runs/a", os.O_RDONLY)  # as a live run holds it
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        assert_bad_input(ppo_discrete.main, ["--resume", checkpoint], "runs/a is in use by another running", capsys)
        assert files_of("runs/a") == before
    finally:
        os.close(holder)
    assert ppo_discrete.main(["--resume", checkpoint, "--no-progress"]) == 0  # free once the holder is gone


def test_two_resumes_started_together_one_is_refused_and_a_killed_run_frees_its_folder(in_tmp_dir):
    import ppo_discrete

    args = tiny(ppo_discrete, run_name="a", checkpoint_every=1, total_timesteps=10**7, num_steps=64)
    ppo_discrete.train(args, stop_at_step=args.batch_size)
    first = start_script("ppo_discrete.py", "--resume", "runs/a/checkpoint.pt", "--no-progress")
    deadline = time.time() + 60
    while not glob.glob("runs/a/events.*") or len(glob.glob("runs/a/events.*")) < 2:
        assert time.time() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.2)
    second = run_script("ppo_discrete.py", "--resume", "runs/a/checkpoint.pt", "--no-progress")
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        "error: runs/a is in use by another running process; wait for it to end"
    ]
    first.send_signal(signal.SIGKILL)  # the lock goes with the process, however it ends
    first.communicate(timeout=60)
    again = start_script("ppo_discrete.py", "--resume", "runs/a/checkpoint.pt", "--no-progress")
    time.sleep(3)
    assert again.poll() is None, again.communicate()  # it runs
    again.send_signal(signal.SIGKILL)
    again.communicate(timeout=60)


def test_a_locked_folder_is_refused_under_torchrun_in_one_line(in_tmp_dir):
    os.makedirs("runs/x")
    holder = os.open("runs/x", os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
            + [os.path.join(ROOT, "ppo_discrete.py"), "--run-name", "x", "--total-timesteps", "4096", "--no-progress"],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    finally:
        os.close(holder)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: runs/x is in use by another running process; wait for it to end"], out.stderr[-3000:]
    assert os.listdir("runs/x") == []


# ----------------------------------------------------------------------------------------------------
# Messages promise only what is there
# ----------------------------------------------------------------------------------------------------
def test_the_closing_line_offers_no_checkpoint_that_was_not_written(capsys, monkeypatch):
    import ppo_discrete

    real_write = ppo_discrete.write_file

    def full_disk_for_checkpoints(path, data):
        if path.endswith("checkpoint.pt"):
            raise ppo_discrete.RunError(
                f"cannot write {path} (File too large); the last good file there, if any, is kept"
            )
        real_write(path, data)

    monkeypatch.setattr(ppo_discrete, "write_file", full_disk_for_checkpoints)
    assert ppo_discrete.main(tiny_argv(ppo_discrete, checkpoint_every=1)) == 1
    err = capsys.readouterr().err
    assert "cannot write runs/tiny/checkpoint.pt" in err and "--resume" not in err, err
    assert not os.path.exists("runs/tiny/checkpoint.pt")


def test_a_name_taken_by_a_run_without_checkpoint_offers_no_resume(capsys):
    import ppo_discrete

    ppo_discrete.train(tiny(ppo_discrete))
    assert_bad_input(ppo_discrete.main, tiny_argv(ppo_discrete), "runs/tiny holds another run", capsys)
    ppo_discrete.main(tiny_argv(ppo_discrete))
    assert "--resume" not in capsys.readouterr().err


def test_a_folder_left_empty_is_taken_over_and_a_signal_before_training_leaves_none(capsys, monkeypatch):
    import ppo_discrete

    os.makedirs("runs/tiny")  # what a run killed right after making its folder leaves
    assert ppo_discrete.main(tiny_argv(ppo_discrete)) == 0
    assert json.load(open("runs/tiny/summary.json"))["finished"] is True
    monkeypatch.setattr(ppo_discrete, "CATCH_SIGNALS", True)  # as under __main__
    make_envs = ppo_discrete.make_envs
    monkeypatch.setattr(
        ppo_discrete, "make_envs", lambda *a, **kw: signal.raise_signal(signal.SIGTERM) or make_envs(*a, **kw)
    )
    assert ppo_discrete.main(tiny_argv(ppo_discrete, run_name="early")) == 128 + signal.SIGTERM
    assert not os.path.exists("runs/early")


# ----------------------------------------------------------------------------------------------------
# A shared agent.pt steers nothing
# ----------------------------------------------------------------------------------------------------
def saved_agent(ppo, **changes) -> str:
    ppo.train(tiny(ppo, save_model=True))
    data = load("runs/tiny/agent.pt")
    data["args"].update(changes)
    torch.save(data, "shared.pt")
    return "shared.pt"


def test_a_shared_agent_imports_no_module_it_names(in_tmp_dir, capsys):
    import ppo_discrete

    (in_tmp_dir / "sidefx.py").write_text("open('imported', 'w').write('x')\n")
    path = saved_agent(ppo_discrete, env_id="sidefx:Foo-v0")
    expected = "which imports the module sidefx; a file never imports code by itself: pass --env-id sidefx:Foo-v0"
    assert_bad_input(ppo_discrete.main, ["--eval-checkpoint", path], expected, capsys)
    assert not os.path.exists("imported")
    # Named by the user, the module is imported (and here registers no such env: one line).
    argv = ["--eval-checkpoint", path, "--env-id", "sidefx:Foo-v0"]
    assert_bad_input(ppo_discrete.main, argv, "--env-id sidefx:Foo-v0", capsys)
    assert os.path.exists("imported")
    assert_bad_input(ppo_discrete.main, ["--eval-checkpoint", path, "--env-id", "Acrobot-v1"], "was trained on", capsys)


def test_a_shared_agent_s_options_are_checked_before_its_network_is_built(capsys, monkeypatch):
    import ppo_discrete

    path = saved_agent(ppo_discrete, lstm=True, lstm_hidden_size=2000)
    built = []
    real_init = ppo_discrete.Agent.__init__

    def recording(self, envs, lstm_size=0):
        built.append((lstm_size, torch.get_default_device().type))
        real_init(self, envs, lstm_size)

    monkeypatch.setattr(ppo_discrete.Agent, "__init__", recording)
    expected = "does not fit the network its options describe (critic_lstm.bias_hh_l0: None in the file, (8000,) by"
    assert_bad_input(ppo_discrete.main, ["--eval-checkpoint", path], expected, capsys)
    assert built == [(2000, "meta")]  # the network was described, never allocated


def test_files_with_options_of_the_wrong_type_or_missing_parts_are_one_line(capsys):
    import ppo_discrete

    path = saved_agent(ppo_discrete, num_envs="four")
    expected = "--eval-checkpoint shared.pt holds --num-envs 'four', not a value of that option"
    assert_bad_input(ppo_discrete.main, ["--eval-checkpoint", path], expected, capsys)
    checkpoint = load(stopped_run(ppo_discrete))
    for part, value in (("ranks", None), ("global_step", "12")):
        broken = {**checkpoint, part: value}
        torch.save(broken, "broken.pt")
        expected = f"--resume broken.pt has no valid '{part}'; it is not a whole checkpoint of ppo_discrete.py"
        assert_bad_input(ppo_discrete.main, ["--resume", "broken.pt"], expected, capsys)
    torch.save({**checkpoint, "args": {**checkpoint["args"], "gamma": "high"}}, "broken.pt")
    assert_bad_input(ppo_discrete.main, ["--resume", "broken.pt"], "holds --gamma 'high'", capsys)


def test_options_that_evaluation_ignores_are_refused(capsys):
    import ppo_discrete

    path = saved_agent(ppo_discrete)
    for option in (["--resume", path], ["--learning-rate", "0.1"], ["--no-anneal-lr"], ["--lstm"], ["--cuda"]):
        expected = f"{option[0].replace('--no-', '--')} is not used by --eval-checkpoint"
        assert_bad_input(ppo_discrete.main, ["--eval-checkpoint", path, *option], expected, capsys)


# ----------------------------------------------------------------------------------------------------
# One line where one line is promised
# ----------------------------------------------------------------------------------------------------
def test_help_into_a_pipe_that_closes_early_is_quiet():
    # `true` reads nothing and is gone before the script writes: every write meets a closed pipe.
    out = subprocess.run(
        f"{sys.executable} {os.path.join(ROOT, 'ppo_discrete.py')} --help | true",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stderr == "", out.stderr


FAULTY_ENV = """
import gymnasium as gym
import numpy as np


class Faulty(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.full(2, np.nan if self.t >= 50 else 0.0, np.float32), 1.0, self.t >= 100, False, {}


gym.register("Faulty-v0", entry_point=Faulty)
"""


def test_an_env_fault_in_a_process_of_its_own_is_one_line(in_tmp_dir):
    (in_tmp_dir / "faulty.py").write_text(FAULTY_ENV)  # every env turns NaN at its 50th step
    argv = ["--env-id", "faulty:Faulty-v0", "--async-envs", "--total-timesteps", "2048", "--no-progress"]
    out = run_script("ppo_discrete.py", *argv)
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: env "), out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Worker" not in out.stderr, out.stderr[-3000:]


def test_a_full_disk_under_the_tensorboard_log_is_one_line_once(in_tmp_dir):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    argv = ["--total-timesteps", "409600", "--checkpoint-minutes", "0", "--no-progress", "--run-name", "full"]
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "ppo_discrete.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.count("cannot write the TensorBoard log") == 1, out.stderr[-3000:]
    assert "--resume" not in out.stderr


def test_track_without_a_wandb_login_is_one_line(in_tmp_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(WANDB_MODE="online", HOME=str(in_tmp_dir), WANDB_CONFIG_DIR=str(in_tmp_dir))
    out = run_script("ppo_discrete.py", *tiny_argv(__import__("ppo_discrete")), "--track", env=env, timeout=200)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: --track: Weights & Biases did not start"), out.stderr[-3000:]
    assert "Traceback" not in out.stderr and not os.path.exists("runs/tiny")


def test_an_lstm_too_large_for_memory_names_its_size(capsys):
    import ppo_discrete

    assert ppo_discrete.main(tiny_argv(ppo_discrete, lstm=True, lstm_hidden_size=100_000)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: out of memory") and "lower --lstm-hidden-size" in err[-1], err


# ----------------------------------------------------------------------------------------------------
# Code that imports a script keeps Python's own Ctrl-C and SIGTERM
# ----------------------------------------------------------------------------------------------------
def test_train_called_from_other_code_stops_on_sigterm_at_once(in_tmp_dir):
    code = (
        "import ppo_discrete as p; "
        "p.train(p.Args(total_timesteps=10**8, num_steps=2048, progress=False, run_name='lib'))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=in_tmp_dir, env={**os.environ, "PYTHONPATH": ROOT}, stderr=subprocess.PIPE
    )
    deadline = time.time() + 60
    while not glob.glob("runs/lib/events.*"):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    started = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM and time.time() - started < 5
    assert not os.path.exists("runs/lib/checkpoint.pt")
