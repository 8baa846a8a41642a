"""Data-parallel training under torchrun, on the CPU with Gloo: two ranks on this machine."""

import glob
import os
import subprocess
import sys
import time

import pytest
import torch

import ppo_discrete
from helpers import ROOT, load, same_params

WORKER = os.path.join(ROOT, "tests", "dp_worker.py")
# 2 ranks x 2 envs x 64 steps = one global batch of 256; 2048 steps = 8 updates.
SMALL = [
    "--total-timesteps",
    "2048",
    "--num-envs",
    "2",
    "--num-steps",
    "64",
    "--no-progress",
    "--checkpoint-every",
    "4",
]


def torchrun(module: str, out, *args: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    os.makedirs(out, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--monitor-interval",
        "0.5",
        WORKER,
        module,
        str(out),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})


def ranks(out) -> list[dict]:
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def check_reductions(rank: int, init_file: str) -> None:
    """Run in each of two spawned ranks: the cross-rank helpers equal the formulas on the joined data."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    adv, y, pred = torch.randn(2, 40) * 5 + 2, torch.randn(2, 60) * 3 + 7, torch.randn(2, 60)
    pred = y + pred
    # Per-minibatch advantage normalization over the union of the ranks' minibatches.
    joined = (adv.flatten() - adv.mean()) / (adv.std() + 1e-8)
    torch.testing.assert_close(ppo_discrete.normalize(adv[rank]), joined.view(2, 40)[rank])
    ev, _ = ppo_discrete.explained_variance(pred[rank], y[rank]).tolist()
    assert ev == pytest.approx((1 - (y - pred).var() / y.var()).item(), rel=1e-5)
    p = torch.nn.Parameter(torch.zeros(2, 3))
    p.grad = torch.full((2, 3), float(rank))
    ppo_discrete.average_gradients([p])
    assert torch.equal(p.grad, torch.full((2, 3), 0.5))
    dist.destroy_process_group()


def test_cross_rank_helpers_on_two_ranks(tmp_path):
    torch.multiprocessing.spawn(check_reductions, args=(str(tmp_path / "init"),), nprocs=2)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """One 8-update run of ppo_discrete.py on two ranks, in a folder of its own."""
    folder = tmp_path_factory.mktemp("dp")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        proc = torchrun("ppo_discrete", folder / "out", *SMALL, "--run-name", "full", "--save-model")
    finally:
        os.chdir(cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def test_two_ranks_hold_identical_parameters_and_count_global_steps(two_rank_run):
    r0, r1 = ranks(two_rank_run / "out")
    assert same_params(r0["model"], r1["model"])
    assert r0["global_step"] == r1["global_step"] == 2048
    # Rank 0 logs every rank's episodes; rank 1 keeps only its own.
    assert r0["episodes"] > r1["episodes"] > 0
    # Only rank 0 wrote logs and files: one run folder, one TensorBoard file.
    assert os.listdir(two_rank_run / "runs") == ["full"]
    assert len(glob.glob(str(two_rank_run / "runs" / "full" / "events.out.tfevents.*"))) == 1
    saved = torch.load(two_rank_run / "runs" / "full" / "agent.pt", weights_only=True)
    assert same_params(saved["model"], r0["model"])


def test_resume_of_a_two_rank_run_matches_the_run_that_was_not_stopped(two_rank_run, in_tmp_dir):
    part = torchrun("ppo_discrete", in_tmp_dir / "a", *SMALL, "--run-name", "part", STOP_AT="1024")
    assert part.returncode == 0, part.stderr[-3000:]
    assert ranks(in_tmp_dir / "a")[0]["global_step"] == 1024
    rest = torchrun("ppo_discrete", in_tmp_dir / "b", "--resume", "runs/part/checkpoint.pt")
    assert rest.returncode == 0, rest.stderr[-3000:]
    resumed, full = ranks(in_tmp_dir / "b"), ranks(two_rank_run / "out")
    assert resumed[0]["global_step"] == 2048
    assert same_params(resumed[0]["model"], full[0]["model"])
    assert same_params(resumed[1]["model"], full[1]["model"])


def test_resume_with_another_number_of_processes_says_so(two_rank_run, capsys):
    path = str(two_rank_run / "runs" / "full" / "checkpoint.pt")
    assert ppo_discrete.main(["--resume", path, "--total-timesteps", "4096"]) == 2
    err = capsys.readouterr().err
    assert "2 process(es), not 1" in err and "--nproc-per-node" in err


@pytest.mark.parametrize("mode, message", [("env", "NoSuchEnv-v0"), ("update", "injected failure on rank 1")])
def test_one_failing_rank_ends_the_job(in_tmp_dir, mode, message):
    start = time.time()
    proc = torchrun(
        "ppo_discrete", in_tmp_dir / "out", *SMALL, "--run-name", "fail", timeout=90, FAIL_RANK="1", FAIL_MODE=mode
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert time.time() - start < 90


def test_continuous_ranks_share_parameters_and_normalization(in_tmp_dir):
    proc = torchrun(
        "ppo_continuous",
        in_tmp_dir / "out",
        "--env-id",
        "InvertedPendulum-v5",
        "--total-timesteps",
        "2048",
        "--num-envs",
        "1",
        "--num-steps",
        "256",
        "--num-minibatches",
        "4",
        "--update-epochs",
        "2",
        "--no-progress",
        "--run-name",
        "c",
        "--save-model",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = ranks(in_tmp_dir / "out")
    assert same_params(r0["model"], r1["model"])
    # Every rank normalizes with the statistics of all ranks' observations: 2048 of them plus the resets.
    for k in ("mean", "var"):
        torch.testing.assert_close(r0["obs_rms"][k], r1["obs_rms"][k], rtol=0, atol=0)
    assert r0["obs_rms"]["count"] == pytest.approx(2048 + 2, abs=1)
    saved = torch.load(in_tmp_dir / "runs" / "c" / "agent.pt", weights_only=True)
    torch.testing.assert_close(saved["env_stats"]["obs_rms"]["mean"], r0["obs_rms"]["mean"], rtol=0, atol=0)


def test_atari_ranks_share_parameters(in_tmp_dir):
    proc = torchrun(
        "ppo_atari",
        in_tmp_dir / "out",
        "--total-timesteps",
        "256",
        "--num-envs",
        "1",
        "--num-steps",
        "64",
        "--num-minibatches",
        "2",
        "--update-epochs",
        "1",
        "--no-cuda",
        "--torch-threads",
        "1",
        "--no-progress",
        "--run-name",
        "a",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = ranks(in_tmp_dir / "out")
    assert same_params(r0["model"], r1["model"])
    assert r0["global_step"] == 256


def test_lstm_ranks_share_parameters_and_each_keeps_its_state(in_tmp_dir):
    # Masks and --lstm together: each rank carries its own envs' LSTM states; the checkpoint keeps every rank's.
    # A state holds (h, c) of the actor's LSTM and of the critic's: 4 x 8 numbers per env.
    proc = torchrun(
        "ppo_discrete",
        in_tmp_dir / "out",
        "--env-id",
        "TestMasked-v0",
        "--lstm",
        "--lstm-hidden-size",
        "8",
        "--total-timesteps",
        "512",
        "--num-envs",
        "2",
        "--num-steps",
        "32",
        "--no-progress",
        "--run-name",
        "lstm",
        "--checkpoint-every",
        "2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = ranks(in_tmp_dir / "out")
    assert same_params(r0["model"], r1["model"]) and "critic_lstm.weight_hh_l0" in r0["model"]
    states = [
        rank["carried"][2]
        for rank in torch.load(in_tmp_dir / "runs" / "lstm" / "checkpoint.pt", weights_only=True)["ranks"]
    ]
    assert states[0].shape == (2, 32) and not torch.equal(states[0], states[1])


def test_action_masks_travel_with_the_observations_across_ranks(in_tmp_dir):
    # Taxi-v4 gives action masks: they ride in the observation, so two ranks train on them like on any other.
    proc = torchrun(
        "ppo_discrete",
        in_tmp_dir / "out",
        "--env-id",
        "Taxi-v4",
        "--total-timesteps",
        "1024",
        "--num-envs",
        "2",
        "--num-steps",
        "64",
        "--no-progress",
        "--run-name",
        "taxi",
        "--checkpoint-every",
        "2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = ranks(in_tmp_dir / "out")
    assert same_params(r0["model"], r1["model"])
    ckpt = torch.load(in_tmp_dir / "runs" / "taxi" / "checkpoint.pt", weights_only=True)
    assert all(rank["carried"][0].shape == (2, 500 + 6) for rank in ckpt["ranks"])  # one-hot state, then the mask


# Each script on an env whose ranks see data of their own and whose episodes do not end within the run:
# (env, envs per rank, steps per env, options). The CNN keeps its default learning rate: at 3e-3 Adam
# turns the float noise of its near-zero gradients into steps of about that size.
EQUIVALENCE = {
    "ppo_discrete": ("TestLevels-v0", 2, 64, ["--learning-rate", "3e-3"]),
    "ppo_continuous": ("TestLevelsContinuous-v0", 2, 64, ["--learning-rate", "3e-3"]),
    "ppo_atari": ("BreakoutNoFrameskip-v4", 1, 32, ["--no-cuda", "--torch-threads", "1"]),
}


@pytest.mark.parametrize("module", EQUIVALENCE)
def test_two_ranks_update_like_one_process_with_the_same_global_batch(module, in_tmp_dir):
    # 2 ranks x n envs against 1 process x 2n envs, the same env seeds, actions that need no random draw (the
    # most likely one; in ppo_continuous.py the mean plus half a std), so both take the same actions, one
    # minibatch per epoch (so both learn from the same samples in each step): 4 updates x 2 epochs of Adam
    # on identical global minibatches. The ranks' envs see data of their own, so advantage normalization
    # over one rank's part, or gradient clipping before the average, would move the parameters far from
    # the single process's. (ppo_continuous.py's observation and reward statistics stay at their start
    # here: each rank's own would differ until the merge.)
    env_id, n, steps, options = EQUIVALENCE[module]
    total = 4 * 2 * n * steps
    common = [
        "--env-id",
        env_id,
        "--num-steps",
        str(steps),
        "--num-minibatches",
        "1",
        "--update-epochs",
        "2",
        "--total-timesteps",
        str(total),
        "--no-progress",
        "--checkpoint-every",
        "4",
        *options,
    ]
    patches = {"SAME_ACTIONS": "1", **({"FROZEN_STATS": "1"} if module == "ppo_continuous" else {})}
    two = torchrun(module, in_tmp_dir / "two", *common, "--num-envs", str(n), "--run-name", "two", **patches)
    assert two.returncode == 0, two.stderr[-3000:]
    os.makedirs(in_tmp_dir / "one")
    one = subprocess.run(
        [
            sys.executable,
            WORKER,
            module,
            str(in_tmp_dir / "one"),
            *common,
            "--num-envs",
            str(2 * n),
            "--run-name",
            "one",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **patches},
    )
    assert one.returncode == 0, one.stderr[-3000:]
    single = torch.load(in_tmp_dir / "one" / "rank0.pt", weights_only=True)
    r0 = ranks(in_tmp_dir / "two")[0]
    assert r0["global_step"] == single["global_step"] == total
    # The same updates, the same number of Adam steps (4 updates x 2 epochs x 1 minibatch), on minibatches of the
    # same global size; the two ranks' checkpoint holds each rank's envs.
    ckpt1 = load(in_tmp_dir / "runs" / "one" / "checkpoint.pt")
    ckpt2 = load(in_tmp_dir / "runs" / "two" / "checkpoint.pt")
    assert ckpt1["iteration"] == ckpt2["iteration"] == 4
    assert ckpt1["global_step"] == ckpt2["global_step"] == total
    assert [float(c["optimizer"]["state"][0]["step"]) for c in (ckpt1, ckpt2)] == [8.0, 8.0]
    assert r0["world_size"] * r0["minibatch_size"] == single["minibatch_size"] == 2 * n * steps
    assert len(ckpt2["ranks"]) == 2 and len(ckpt1["ranks"]) == 1
    # Exact but for the order of float32 sums (two means of half the batch averaged, against one mean of
    # all of it): the parameters agree to 2e-6 or better; each break above moves them by 4e-4 or more.
    for k in single["model"]:
        torch.testing.assert_close(r0["model"][k], single["model"][k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("world_size, teardown", [("2", False), ("1", True)])
def test_a_torchrun_rank_exits_without_the_interpreter_teardown(world_size, teardown):
    # Gloo's threads sometimes abort a rank in the teardown, after the run ended well: a rank skips it.
    code = (
        "import atexit, sys; sys.path.insert(0, sys.argv[1]); import ppo_discrete; "
        "atexit.register(print, 'teardown'); print('output first', end=''); ppo_discrete.exit_with(3)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, ROOT],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WORLD_SIZE": world_size},
    )
    assert out.returncode == 3, out.stderr[-2000:]
    assert out.stdout.startswith("output first") and ("teardown" in out.stdout) == teardown
