"""Running an experiment, on every script: options and their one-line refusals, help, the files a run writes, its
logs and closing line, its own folder, evaluation of a saved agent, your own env, video, wandb, health warnings, and
files that run no code when they are read."""

import glob
import importlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import time
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
import tyro

from helpers import ROOT, SCRIPTS, assert_bad_input, load, logged, run_script, start_script, tiny, tiny_argv


def doc_section(path: str, heading: str) -> str:
    """A section of a document of the project, from its heading to the next one of the same level."""
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    start = text.index(heading + "\n")
    end = text.find("\n" + heading.split()[0] + " ", start + len(heading))
    return text[start : end if end > 0 else None]


def code_block(section: str, language: str) -> str:
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


# ----------------------------------------------------------------------------------------------------
# Options: one line for every bad one, before anything starts
# ----------------------------------------------------------------------------------------------------
BAD = [  # (script, argv, what the line must say)
    ("ppo_discrete", ["--env-id", "CartPol-v1"], "Did you mean: `CartPole`?"),
    (
        "ppo_discrete",
        ["--env-id", "Pendulum-v1"],
        "has continuous actions (Box(-2.0, 2.0, (1,), float32)); train it with ppo_continuous.py",
    ),
    ("ppo_discrete", ["--env-id", "TestImage-v0"], "train it with ppo_atari.py"),
    ("ppo_discrete", ["--env-id", "BreakoutNoFrameskip-v4"], "is an Atari game; train it with ppo_atari.py"),
    ("ppo_discrete", ["--env-id", ":CartPole-v1"], "--env-id :CartPole-v1: ValueError: Empty module name"),
    ("ppo_discrete", ["--env-id", "nosuchmodule:MyEnv-v0"], "No module named 'nosuchmodule'"),
    (
        "ppo_discrete",
        ["--num-minibatches", "3"],
        "--num-minibatches 3 does not fit the batch (num_envs * num_steps = 4 * 128 = 512)",
    ),
    ("ppo_discrete", ["--num-minibatches", "1024"], "e.g. 128"),
    ("ppo_discrete", ["--num-envs", "0"], "--num-envs is 0; it must be positive"),
    ("ppo_discrete", ["--num-steps", "-5"], "--num-steps is -5"),
    ("ppo_discrete", ["--total-timesteps", "100"], "--total-timesteps 100 is less than one batch (512"),
    ("ppo_discrete", ["--gamma", "1.5"], "--gamma is 1.5; it must be in [0, 1]"),
    ("ppo_discrete", ["--gae-lambda", "-0.1"], "--gae-lambda is -0.1"),
    ("ppo_discrete", ["--learning-rate", "0"], "--learning-rate is 0.0; it must be positive"),
    ("ppo_discrete", ["--target-kl", "0"], "--target-kl is 0.0"),
    ("ppo_discrete", ["--seed", "-1"], "--seed is -1; it must be in [0, 2**31)"),
    ("ppo_discrete", ["--seed", "4294967296"], "--seed is 4294967296"),
    ("ppo_discrete", ["--eval-seed", "-5"], "--eval-seed is -5; it must be in [0, 2**32)"),
    ("ppo_discrete", ["--eval-seed", "100000000000000000000000"], "--eval-seed is 100000000000000000000000; it must"),
    ("ppo_discrete", ["--num-minibatches", "1000000000"], "--num-minibatches 1000000000 does not fit the batch"),
    ("ppo_discrete", ["--num-minibatches", "1000000000000"], "e.g. 128"),
    ("ppo_discrete", ["--clip-coef", "1e308"], "--clip-coef is 1e+308; it must be a finite number of at most 3.4e+38"),
    ("ppo_discrete", ["--torch-threads", "100000"], "--torch-threads is 100000; it must be in [0, "),
    ("ppo_discrete", ["--run-name", ".."], "--run-name '..' is not a plain folder name"),
    ("ppo_discrete", ["--run-name", "a/b"], "--run-name 'a/b' is not a plain folder name"),
    ("ppo_discrete", ["--resume", "nowhere.pt"], "--resume nowhere.pt does not exist"),
    ("ppo_discrete", ["--resume", "."], "--resume . is a folder; pass the file in it, e.g. ./checkpoint.pt"),
    ("ppo_discrete", ["--resume", "a.pt", "--resume=b.pt"], "--resume is given 2 times (a.pt, b.pt); give it once"),
    ("ppo_discrete", ["--eval-checkpoint", "nowhere.pt"], "--eval-checkpoint nowhere.pt does not exist"),
    ("ppo_discrete", ["--ent-coef", "nan"], "--ent-coef is nan; it must be a finite number"),
    ("ppo_discrete", ["--clip-coef", "inf"], "--clip-coef is inf; it must be a finite number"),
    (
        "ppo_continuous",
        ["--env-id", "CartPole-v1"],
        "has discrete actions (Discrete(2)); train it with ppo_discrete.py",
    ),
    ("ppo_continuous", ["--env-id", "ALE/Pong-v5"], "is an Atari game; train it with ppo_atari.py"),
    ("ppo_continuous", ["--env-id", "HalfCheeta-v5"], "Did you mean: `HalfCheetah`?"),
    ("ppo_continuous", ["--clip-obs", "0"], "--clip-obs is 0.0; it must be positive"),
    ("ppo_continuous", ["--num-steps", "64"], "--num-minibatches 32 does not fit the batch"),
    ("ppo_continuous", ["--learning-rate", "-inf"], "--learning-rate is -inf; it must be a finite number"),
    ("ppo_atari", ["--env-id", "CartPole-v1"], "is not an Atari game; train it with ppo_discrete.py"),
    ("ppo_atari", ["--env-id", "BreakoutNoFrameskip-v5"], "It provides versioned environments: [ `v0`, `v4` ]"),
    ("ppo_atari", ["--sticky-actions", "1.5"], "--sticky-actions is 1.5; it must be in [0, 1)"),
    ("ppo_atari", ["--frame-stack", "0"], "--frame-stack is 0; it must be positive"),
    ("ppo_discrete", ["--lstm", "--lstm-hidden-size", "0"], "--lstm-hidden-size is 0; it must be positive"),
    ("ppo_atari", ["--gamma", "nan"], "--gamma is nan"),
]


@pytest.mark.parametrize("script, argv, expected", BAD, ids=[f"{s} {' '.join(a)}" for s, a, _ in BAD])
def test_bad_input_is_one_clear_line_before_anything_starts(script, argv, expected, capsys):
    assert_bad_input(__import__(script).main, argv, expected, capsys)
    assert not os.path.exists("runs")  # nothing started


def test_the_minibatch_count_a_refusal_suggests_is_accepted(capsys):
    import ppo_discrete

    for asked, batch in ((1024, dict()), (3, dict()), (64, dict(num_envs=1, num_steps=64))):
        ppo_discrete.main(
            [
                *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in batch.items()), []),
                "--num-minibatches",
                str(asked),
                "--no-progress",
            ]
        )
        suggested = int(re.search(r"e\.g\. (\d+)", capsys.readouterr().err).group(1))
        ppo_discrete.check_args(ppo_discrete.Args(**batch, num_minibatches=suggested))  # no error


def test_a_rollout_too_large_for_memory_is_one_line(ppo, monkeypatch, capsys):
    # Billions of steps: the option check must not walk every minibatch count (the alarm turns such a hang into a
    # failure), and the allocator's refusal becomes one line naming the options to lower.
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("check_args walked the whole batch"))
    signal.alarm(20)
    try:
        big = dict(num_envs=4, num_steps=10**9, total_timesteps=4 * 10**9)
        ppo.check_args(ppo.Args(**big))
        with pytest.raises(ppo.UsageError, match=r"e\.g\. 2$"):
            ppo.check_args(ppo.Args(**big, num_minibatches=3))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    zeros = torch.zeros

    def refuse(*shape, **kw):  # what the allocator says where the memory is not there (the CI machine may have it)
        if math.prod(shape[0] if isinstance(shape[0], tuple) else shape) > 10**8:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 96000000096 bytes")
        return zeros(*shape, **kw)

    monkeypatch.setattr(ppo.torch, "zeros", refuse)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in big.items()] + ["--no-progress"]
    assert ppo.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: out of memory") and "lower --num-envs or --num-steps" in err[-1], err


@pytest.mark.parametrize(
    "module, expected",
    [
        ("emptymodule", "Environment `MyEnv` doesn't exist."),
        ("othermodule", "Environment `MyEnv` doesn't exist."),
    ],
)
def test_a_module_that_does_not_register_the_env_is_one_line(ppo, module, expected, in_tmp_dir, capsys):
    (in_tmp_dir / "emptymodule.py").write_text("x = 1\n")
    (in_tmp_dir / "othermodule.py").write_text(
        "import gymnasium as gym\n\nclass Other(gym.Env):\n    pass\n\n"
        "if 'OtherEnv-v0' not in gym.registry:\n    gym.register('OtherEnv-v0', entry_point=Other)\n"
    )
    assert_bad_input(ppo.main, ["--env-id", f"{module}:MyEnv-v0"], expected, capsys)


def test_an_env_whose_package_is_missing_is_one_line(capsys):
    import ppo_discrete

    class NeedsBox2D(gym.Env):
        def __init__(self):
            raise gym.error.DependencyNotInstalled('Box2D is not installed, run `pip install "gymnasium[box2d]"`')

    if "TestNeedsBox2D-v0" not in gym.registry:
        gym.register("TestNeedsBox2D-v0", entry_point=NeedsBox2D)
    assert_bad_input(ppo_discrete.main, ["--env-id", "TestNeedsBox2D-v0"], 'pip install "gymnasium[box2d]"', capsys)


def test_a_vector_env_that_resets_in_the_same_step_is_refused(ppo, monkeypatch, capsys):
    make_envs = ppo.make_envs

    def same_step(args, num_envs, video_dir=None):
        envs = make_envs(args, num_envs, video_dir)
        envs.unwrapped.metadata = {**envs.unwrapped.metadata, "autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}
        return envs

    monkeypatch.setattr(ppo, "make_envs", same_step)
    assert_bad_input(ppo.main, tiny_argv(ppo), "handles only gymnasium's default, AutoresetMode.NEXT_STEP", capsys)
    assert not os.path.exists("runs/tiny")  # the run folder made for it is gone again


def test_from_the_command_line_bad_input_has_no_traceback():
    out = run_script("ppo_discrete.py", "--env-id", "Pendulum-v1")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "ppo_continuous.py" in out.stderr
    out = run_script("ppo_discrete.py", "--num-envs", "abc")  # tyro's own message for a malformed value
    assert out.returncode == 2 and "Traceback" not in out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_option_with_its_explanation_and_reads_no_file(script):
    out = run_script(f"{script}.py", "--help", "--resume", "missing.pt")  # help first: the file is not looked for
    assert out.returncode == 0, out.stderr
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", out.stdout).split())  # tyro's boxes wrap the lines
    for name in __import__(script).Args.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text, name
    assert "discount factor" in text and "resuming runs code from it: resume only your own runs" in text


def test_the_defaults_are_the_classic_ones():
    import ppo_discrete

    args = tyro.cli(ppo_discrete.Args, args=[])
    assert (args.env_id, args.total_timesteps, args.learning_rate, args.num_envs, args.num_steps) == (
        "CartPole-v1",
        500_000,
        2.5e-4,
        4,
        128,
    )
    assert (args.gamma, args.gae_lambda, args.num_minibatches, args.update_epochs, args.clip_coef) == (
        0.99,
        0.95,
        4,
        4,
        0.2,
    )
    assert (args.ent_coef, args.vf_coef, args.max_grad_norm, args.target_kl, args.seed) == (0.01, 0.5, 0.5, None, 1)
    assert args.norm_adv and args.clip_vloss and args.anneal_lr
    assert (args.batch_size, args.batch_size // args.num_minibatches, args.num_iterations) == (512, 128, 976)


# ----------------------------------------------------------------------------------------------------
# What a run writes, and where
# ----------------------------------------------------------------------------------------------------
TAGS = [
    "losses/policy_loss",
    "losses/value_loss",
    "losses/entropy",
    "losses/old_approx_kl",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
    "losses/ess",
    "losses/grad_norm",
    "losses/epochs",
    "charts/learning_rate",
    "charts/SPS",
    "charts/episodic_return",
    "charts/episodic_length",
]


def test_a_run_writes_its_logs_results_and_agent(ppo):
    args = tiny(ppo, save_model=True, total_timesteps=4 * tiny(ppo).batch_size)
    result = ppo.train(args)
    folder = result["run_dir"]
    assert folder == "runs/tiny" and len(glob.glob(f"{folder}/events.out.tfevents.*")) == 1
    for tag in TAGS[:-2] + (TAGS[-2:] if ppo.__name__ != "ppo_atari" else []):  # no Breakout game ends in 128 steps
        assert len(logged(folder, tag)) == 4, tag
    rows = open(f"{folder}/episodes.csv").read().splitlines()
    assert rows[0] == "global_step,time_s,return,length" and len(rows) == len(result["episodes"]["returns"]) + 1
    assert [float(r.split(",")[2]) for r in rows[1:]] == result["episodes"]["returns"]
    summary = json.load(open(f"{folder}/summary.json"))
    assert summary["global_step"] == args.total_timesteps and summary["finished"] and summary["sps"] > 0
    assert summary["script"] == f"{ppo.__name__}.py" and summary["env_id"] == args.env_id
    saved = load(f"{folder}/agent.pt")
    assert saved["family"] == ppo.FAMILY and saved["args"]["env_id"] == args.env_id
    assert sorted(os.listdir(folder)) == sorted(
        ["agent.pt", "episodes.csv", "summary.json", *map(os.path.basename, glob.glob(f"{folder}/events.*"))]
    )


def test_a_run_ends_with_one_line_saying_what_it_did_and_where_its_files_are(ppo):
    out = run_script(f"{ppo.__name__}.py", *tiny_argv(ppo, total_timesteps=2 * tiny(ppo).batch_size, progress=True))
    assert out.returncode == 0, out.stderr
    total = 2 * tiny(ppo).batch_size
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"finished: {total:,} of {total:,} steps in "), last
    assert "steps/s), " in last and last.endswith("files in runs/tiny (tensorboard --logdir runs)")
    # Not a terminal: a plain progress line (every 5% of the steps; here every update).
    assert f"step {total:,}/{total:,} (100%)" in out.stderr


def test_default_run_names_never_collide_and_a_run_folder_is_never_shared(in_tmp_dir):
    # Two runs of the same options started together: each its own folder and results.
    common = [
        "--total-timesteps",
        "2048",
        "--num-steps",
        "64",
        "--checkpoint-every",
        "1",
        "--no-progress",
        "--save-model",
    ]
    procs = [start_script("ppo_discrete.py", *common, "--learning-rate", lr) for lr in ("1e-3", "1e-4")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    folders = sorted(glob.glob("runs/*"))
    assert len(folders) == 2 and all(
        re.fullmatch(r"runs/CartPole-v1__ppo_discrete__1__\d+_[0-9a-f]{8}", f) for f in folders
    )
    rates = sorted(load(f"{f}/agent.pt")["args"]["learning_rate"] for f in folders)
    assert rates == [1e-4, 1e-3] and all(len(glob.glob(f"{f}/events.*")) == 1 for f in folders)
    assert not glob.glob("runs/*/*.tmp")
    # A name given again is refused in one line, before anything trains; the first run's files stay.
    name = os.path.basename(folders[0])
    out = run_script("ppo_discrete.py", "--run-name", name, "--total-timesteps", "512")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: runs/{name} holds another run; choose another --run-name"  # finished: nothing to resume
    ]
    assert load(f"runs/{name}/agent.pt")["args"]["learning_rate"] in (1e-3, 1e-4)


def test_a_copy_of_a_script_names_its_runs_after_itself(in_tmp_dir):
    # A researcher copies a script to change it: the copy's runs carry the copy's name, and its agents load in the
    # original (the same env family) but not in another family's script.
    shutil.copy(os.path.join(ROOT, "ppo_discrete.py"), "my_ppo.py")
    out = run_script(os.path.abspath("my_ppo.py"), "--total-timesteps", "512", "--no-progress", "--save-model")
    assert out.returncode == 0, out.stderr
    (folder,) = glob.glob("runs/*")
    assert "__my_ppo__" in folder and json.load(open(f"{folder}/summary.json"))["script"] == "my_ppo.py"
    assert (
        run_script("ppo_discrete.py", "--eval-checkpoint", f"{folder}/agent.pt", "--eval-episodes", "1").returncode == 0
    )
    out = run_script("ppo_atari.py", "--eval-checkpoint", f"{folder}/agent.pt")
    assert out.returncode == 2 and "holds a discrete agent; this script trains atari ones" in out.stderr


# ----------------------------------------------------------------------------------------------------
# Evaluation of a saved agent
# ----------------------------------------------------------------------------------------------------
def test_evaluation_plays_on_seeds_apart_from_training_and_can_be_deterministic(ppo, monkeypatch, capsys):
    ppo.train(tiny(ppo, save_model=True, seed=3))
    seeds, modes = [], []
    reset, act = gym.wrappers.vector.RecordEpisodeStatistics.reset, ppo.Agent.act
    monkeypatch.setattr(
        gym.wrappers.vector.RecordEpisodeStatistics,
        "reset",
        lambda self, **kw: seeds.append(kw.get("seed")) or reset(self, **kw),
    )
    monkeypatch.setattr(
        ppo.Agent,
        "act",
        lambda self, obs, state, goes_on, deterministic=False: (
            modes.append(deterministic) or act(self, obs, state, goes_on, deterministic)
        ),
    )
    assert ppo.main(["--eval-checkpoint", "runs/tiny/agent.pt", "--eval-episodes", "1"]) == 0
    assert seeds == [1_000_000_003] and set(modes) == {False}
    assert "1 episodes (actions sampled from the policy, env seed 1000000003): return " in capsys.readouterr().out
    seeds.clear(), modes.clear()
    assert (
        ppo.main(
            [
                "--eval-checkpoint",
                "runs/tiny/agent.pt",
                "--eval-episodes",
                "1",
                "--eval-deterministic",
                "--eval-seed",
                "5",
            ]
        )
        == 0
    )
    assert seeds == [5] and set(modes) == {True} and "deterministic actions, env seed 5" in capsys.readouterr().out


def test_evaluation_from_the_command_line_and_of_a_checkpoint(in_tmp_dir):
    import ppo_discrete

    ppo_discrete.train(tiny(ppo_discrete, checkpoint_every=1, save_model=True))
    for path in ("runs/tiny/agent.pt", "runs/tiny/checkpoint.pt"):
        out = run_script("ppo_discrete.py", "--eval-checkpoint", path, "--eval-episodes", "3")
        assert out.returncode == 0 and re.match(r"3 episodes \(.*\): return [\d.]+ \+- [\d.]+ \(min ", out.stdout), out


def test_evaluating_an_agent_of_an_env_whose_module_is_gone_is_one_line(in_tmp_dir, capsys):
    import ppo_discrete

    (in_tmp_dir / "gone.py").write_text(
        code_block(doc_section("docs/usage.md", "## Train your own environment"), "python").replace(
            "Corridor-v0", "GoneCorridor-v0"
        )
    )
    ppo_discrete.train(tiny(ppo_discrete, env_id="gone:GoneCorridor-v0", save_model=True))
    os.remove("gone.py")
    del __import__("sys").modules["gone"]
    gym.registry.pop("GoneCorridor-v0")
    argv = ["--eval-checkpoint", "runs/tiny/agent.pt", "--env-id", "gone:GoneCorridor-v0"]
    assert_bad_input(ppo_discrete.main, argv, "No module named 'gone'", capsys)


# ----------------------------------------------------------------------------------------------------
# Your own environment
# ----------------------------------------------------------------------------------------------------
def test_the_documented_example_env_trains_from_the_command_line_and_is_learned(in_tmp_dir):
    section = doc_section("docs/usage.md", "## Train your own environment")
    module = re.search(r"`(\w+)\.py`", section).group(1)
    (in_tmp_dir / f"{module}.py").write_text(code_block(section, "python"))
    training, evaluation = code_block(section, "bash").strip().splitlines()
    command = training.split()
    assert command[:2] == ["python", "ppo_discrete.py"] and f"{module}:" in " ".join(command)
    out = run_script("ppo_discrete.py", *command[2:], "--run-name", "own", "--no-progress")
    assert out.returncode == 0, out.stderr
    returns = [float(row.split(",")[2]) for row in open("runs/own/episodes.csv").read().splitlines()[1:]]
    assert np.mean(returns[-20:]) > 0.9  # the corridor is walked to its end (the best return is 0.94)
    # The saved agent evaluates as documented, the module named by the user.
    command = evaluation.split("#")[0].replace("runs/<run>", "runs/own").split()
    out = run_script("ppo_discrete.py", *command[2:], "--eval-episodes", "3", "--eval-deterministic")
    assert out.returncode == 0 and "return 0.94" in out.stdout, out.stderr


def test_atari_accepts_a_module_that_registers_an_ale_game(in_tmp_dir):
    import ppo_atari

    (in_tmp_dir / "mygames.py").write_text(
        "import gymnasium as gym\n"
        'gym.register("SlowBreakout-v0", entry_point="ale_py.env:AtariEnv",\n'
        '             kwargs=dict(game="breakout", obs_type="rgb", frameskip=1, repeat_action_probability=0.0))\n'
    )
    out = run_script("ppo_atari.py", *tiny_argv(ppo_atari, env_id="mygames:SlowBreakout-v0"))
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script, env_id", [("ppo_discrete", "LunarLander-v3"), ("ppo_continuous", "BipedalWalker-v3")])
def test_box2d_envs_run_out_of_the_box(script, env_id):
    ppo = importlib.import_module(script)
    assert ppo.train(tiny(ppo, env_id=env_id, total_timesteps=256, update_epochs=2))["global_step"] == 256


# ----------------------------------------------------------------------------------------------------
# Video, wandb, health warnings
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lstm", [False, True])
def test_capture_video(ppo, lstm, capfd):
    ppo.train(tiny(ppo, capture_video=True, lstm=lstm, total_timesteps=2 * tiny(ppo).batch_size))
    videos = glob.glob("videos/tiny/*.mp4")
    assert videos or (ppo.__name__ == "ppo_continuous" and "training goes on without video" in capfd.readouterr().err)


def test_track_with_wandb_offline_adds_no_long_wait(in_tmp_dir):
    start = time.time()
    out = run_script(
        "ppo_discrete.py",
        "--total-timesteps",
        "1024",
        "--num-steps",
        "32",
        "--run-name",
        "tracked",
        "--track",
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert out.returncode == 0, out.stderr
    assert glob.glob("wandb/offline-run-*") and time.time() - start < 30


def test_health_warnings_are_one_line_per_kind():
    import ppo_discrete

    lines = []
    run = SimpleNamespace(
        args=ppo_discrete.Args(target_kl=0.01),
        recent_ev=[],
        warned=set(),
        iteration=900,
        global_step=0,
        say=lines.append,
    )
    check = lambda metrics, vary=True: ppo_discrete.Run.check_health(run, metrics, vary)  # noqa: E731
    good = {"losses/approx_kl": 0.005, "losses/explained_variance": 0.9, "losses/ess": 0.95}
    bad = {"losses/approx_kl": 0.5, "losses/explained_variance": -0.5, "losses/ess": 0.2}
    for _ in range(30):
        check(good)
    assert lines == []
    for _ in range(30):
        check(bad)
    assert len(lines) == 3 and all(line.startswith("warning: ") and line.endswith("shown once)") for line in lines)
    assert [line.split()[1] for line in lines] == ["approx", "effective", "explained"]  # EV: once 10 updates averaged
    assert "approx KL 0.500 > 0.020" in lines[0]
    # Early in training a poor critic is expected; flat returns make explained variance meaningless.
    lines.clear()
    for early, vary in ((True, True), (False, False)):
        run.recent_ev, run.warned, run.iteration = [], set(), 100 if early else 900
        for _ in range(30):
            check({**good, "losses/explained_variance": -1.0}, vary)
    assert lines == []


# ----------------------------------------------------------------------------------------------------
# Files people share run no code when they are read
# ----------------------------------------------------------------------------------------------------
class Payload:
    """Unpickled, it leaves a file named ran (and counts, in it, how often it ran)."""

    def __reduce__(self):
        return eval, ("open('ran', 'a').write('x') and None",)


def payload_runs() -> int:
    return len(open("ran").read()) if os.path.exists("ran") else 0


@pytest.fixture
def saved_run(in_tmp_dir):
    import ppo_discrete

    # Stopped after 3 of its 4 updates: its checkpoint continues an unfinished run.
    args = tiny(ppo_discrete, checkpoint_every=1, save_model=True)
    ppo_discrete.train(args, stop_at_step=3 * args.batch_size)
    return ppo_discrete


@pytest.mark.parametrize(
    "file, argv",
    [
        ("agent", ["--eval-checkpoint", "evil.pt"]),
        ("checkpoint", ["--resume", "evil.pt"]),
        ("checkpoint", ["--resume", "evil.pt", "--total-timesteps", "2048"]),
        ("bare", ["--resume", "evil.pt"]),
        ("bare", ["--eval-checkpoint", "evil.pt"]),
    ],
)
def test_a_file_with_a_payload_is_refused_without_running_it(saved_run, file, argv, capsys):
    data = {"bare": {"evil": Payload()}}.get(file) or {**load(f"runs/tiny/{file}.pt"), "evil": Payload()}
    torch.save(data, "evil.pt")
    assert_bad_input(
        saved_run.main,
        argv,
        "evil.pt cannot be read as a file of ppo_discrete.py (it holds objects "
        "beyond tensors, numbers and strings, which could run code when loaded)",
        capsys,
    )
    assert payload_runs() == 0
    out = run_script("ppo_discrete.py", "--help", *argv)
    assert out.returncode == 0 and payload_runs() == 0


def test_a_checkpoint_s_envs_are_unpickled_only_when_a_resume_passed_every_check(saved_run, capsys, monkeypatch):
    ckpt = load("runs/tiny/checkpoint.pt")
    # The pickled envs of a checkpoint, replaced by code that runs when they are unpickled, then resumes with new
    # episodes. A refused resume never runs it; the documented resume of a file that passes every check runs it once.
    ckpt["ranks"][0]["state"] = pickle.dumps(EnvsPayload(ckpt["ranks"][0]["state"]))
    torch.save(ckpt, "mine.pt")
    for argv, expected in (
        (["--learning-rate", "0.1"], "was trained with --learning-rate"),
        (["--total-timesteps", "256"], "is less than the"),
        (["--eval-checkpoint", "x.pt"], "--resume is not used by --eval-checkpoint"),
    ):
        assert saved_run.main(["--resume", "mine.pt", *argv, "--no-progress"]) == 2, capsys.readouterr()
        assert expected in capsys.readouterr().err and payload_runs() == 0
    assert saved_run.main(["--eval-checkpoint", "mine.pt", "--eval-episodes", "1"]) == 0 and payload_runs() == 0
    loads, real_load = [], torch.load
    monkeypatch.setattr(saved_run.torch, "load", lambda *a, **kw: loads.append(a[0]) or real_load(*a, **kw))
    shutil.copy("mine.pt", "again.pt")
    assert saved_run.main(["--resume", "again.pt", "--total-timesteps", "2048", "--no-progress"]) == 0
    # Read with weights_only (for the options, then for the run), its envs unpickled once.
    assert payload_runs() == 1 and [f for f in loads if isinstance(f, str)] == ["again.pt", "again.pt"]


class EnvsPayload:
    """Unpickled, it runs the payload, then gives the state it wraps."""

    def __init__(self, state: bytes):
        self.state = state

    def __reduce__(self):
        return eval, (f"open('ran', 'a').write('x') and None or __import__('pickle').loads({self.state!r})",)
