"""Every GPU path of the three scripts, run where a CUDA GPU is at hand and skipped elsewhere: training on --cuda with
and without --lstm (ppo_atari.py also with --bf16, and once with --compile), the replay before the first step giving
the rollout's log-probs and values, the same seed giving the same parameters, checkpoints resumed across the GPU and
the CPU, a GPU agent.pt evaluated with --no-cuda, and two torchrun ranks on one GPU. tests/test_devices.py checks on
the CPU what can be checked there."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, run_script, same_params, tiny, tiny_argv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: these tests train on one")
NO_GPU = "no CUDA GPU is available"  # the note of a run with --cuda that trains on the CPU
HIDDEN = 8


def gpu_args(ppo, lstm=False, **kw):
    extra = dict(lstm=True, lstm_hidden_size=HIDDEN) if lstm else {}
    return tiny(ppo, cuda=True, **extra, **kw)


def on_the_gpu(result: dict) -> bool:
    return all(p.is_cuda for p in result["agent"].parameters())


# ----------------------------------------------------------------------------------------------------
# Training on the GPU: the replay before the first step gives what the rollout gave
# ----------------------------------------------------------------------------------------------------
def tolerance(ppo, bf16: bool) -> float:
    """How far the replay's log-probs and values may be from the rollout's, relative to their size (1 at least).

    The replay recomputes the rollout's numbers from the same inputs and parameters in batches of other shapes, so
    only the kernels' rounding differs. float32 (unit roundoff 2**-24 = 6e-8): a few layers of sums of up to 3,136
    terms grow it to some 100 roundings, under 1e-5, the CPU tests' bound. TF32, where cuDNN's convolutions use it
    (torch.backends.cudnn.allow_tf32, on by default; ppo_atari.py's CNN): the CNN's values on the GPU were 8e-4 from
    the CPU's float32 ones (docs/speed.md), and two TF32 computations differ by at most twice that: 2e-3. bfloat16
    (ppo_atari.py --bf16): 8 mantissa bits to TF32's 11, 8 times the roundoff: 2e-2. The rollout and the replay must
    run in one precision: the LSTM's step (torch.lstm_cell, float32 matmuls) and its replay (cuDNN) included."""
    if bf16:
        return 2e-2
    if torch.get_float32_matmul_precision() != "highest":  # TF32 matmuls everywhere
        return 2e-3
    if ppo.__name__ == "ppo_atari" and torch.backends.cudnn.allow_tf32:
        return 2e-3
    return 1e-5


MODES = ["fp32", "lstm", "bf16", "bf16-lstm"]


@pytest.mark.parametrize("mode", MODES)
def test_training_on_the_gpu_replays_the_rollout_s_log_probs_and_values(ppo, monkeypatch, mode):
    bf16 = mode.startswith("bf16")
    if bf16 and ppo.__name__ != "ppo_atari":
        pytest.skip("--bf16 is ppo_atari.py's")
    firsts, calls, loss = [], [0], ppo.ppo_loss
    num_minibatches, epochs = 4, 2

    def spy(newlogp, oldlogp, advantages, newvalue, oldvalue, *a, **kw):
        if calls[0] % (num_minibatches * epochs) == 0:  # the first minibatch of an update: before any step
            size = oldvalue.abs().clamp_min(1)
            firsts.append(((newlogp - oldlogp).abs().amax(), ((newvalue - oldvalue).abs() / size).amax()))
        calls[0] += 1
        return loss(newlogp, oldlogp, advantages, newvalue, oldvalue, *a, **kw)

    monkeypatch.setattr(ppo, "ppo_loss", spy)
    kw = {} if ppo.__name__ == "ppo_continuous" else dict(num_envs=2)
    args = gpu_args(ppo, "lstm" in mode, num_minibatches=num_minibatches, update_epochs=epochs, **kw)
    if bf16:
        args.bf16 = True
    result = ppo.train(dataclasses.replace(args, total_timesteps=3 * args.batch_size))
    assert on_the_gpu(result) and result["global_step"] == 3 * args.batch_size
    assert all(p.isfinite().all() for p in result["agent"].parameters())
    assert len(firsts) == 3
    bound = tolerance(ppo, bf16)
    for logratio, value in firsts:
        assert logratio <= bound and value <= bound, (logratio.item(), value.item(), bound)


def test_compiled_training_on_the_gpu():
    import ppo_atari

    result = ppo_atari.train(gpu_args(ppo_atari, compile=True, total_timesteps=3 * tiny(ppo_atari).batch_size))
    assert on_the_gpu(result) and all(p.isfinite().all() for p in result["agent"].parameters())


@pytest.mark.parametrize("lstm", [False, True], ids=["feedforward", "lstm"])
def test_the_same_seed_gives_the_same_parameters_on_the_gpu(ppo, lstm):
    # --torch-deterministic (the default) sets torch.backends.cudnn.deterministic: cuDNN picks deterministic
    # convolution algorithms, and no other kernel of these runs is known to vary (docs/speed.md says what is promised).
    args = gpu_args(ppo, lstm, total_timesteps=2 * tiny(ppo).batch_size)
    assert args.torch_deterministic
    first = ppo.train(dataclasses.replace(args, run_name="first"))
    second = ppo.train(dataclasses.replace(args, run_name="second"))
    assert on_the_gpu(first)
    assert same_params(first["agent"].state_dict(), second["agent"].state_dict())


# ----------------------------------------------------------------------------------------------------
# Files across devices: a run goes on where the file lands
# ----------------------------------------------------------------------------------------------------
def without_gpu() -> dict:
    """The environment of a process that sees no GPU, as on a machine without one."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_a_checkpoint_resumes_from_the_gpu_on_the_cpu_and_back_and_the_agent_evaluates_without_a_gpu(ppo):
    script, batch = f"{ppo.__name__}.py", tiny(ppo).batch_size
    on_gpu = run_script(script, *tiny_argv(ppo, cuda=True, checkpoint_every=1, total_timesteps=batch))
    assert on_gpu.returncode == 0 and NO_GPU not in on_gpu.stderr, on_gpu.stderr[-3000:]
    # The checkpoint keeps --cuda; where no GPU is seen, the run goes on on the CPU with a note.
    on_cpu = run_script(
        script, "--resume", "runs/tiny/checkpoint.pt", "--total-timesteps", str(2 * batch), env=without_gpu()
    )
    assert on_cpu.returncode == 0 and NO_GPU in on_cpu.stderr, on_cpu.stderr[-3000:]
    back = run_script(
        script, "--resume", "runs/tiny/checkpoint.pt", "--total-timesteps", str(3 * batch), "--save-model"
    )
    assert back.returncode == 0 and NO_GPU not in back.stderr, back.stderr[-3000:]
    with open("runs/tiny/summary.json") as f:
        assert json.load(f)["global_step"] == 3 * batch
    played = run_script(
        script, "--eval-checkpoint", "runs/tiny/agent.pt", "--eval-episodes", "1", "--no-cuda", env=without_gpu()
    )
    assert played.returncode == 0 and "1 episodes" in played.stdout, played.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------
# torchrun: two ranks on one GPU
# ----------------------------------------------------------------------------------------------------
def test_two_torchrun_ranks_on_one_gpu_are_refused_in_one_line():
    # NCCL needs a GPU per rank, and init_distributed gives rank r the GPU LOCAL_RANK: the rank without one says so.
    import ppo_discrete

    first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["--monitor-interval", "0.5", os.path.join(ROOT, "ppo_discrete.py"), *tiny_argv(ppo_discrete, cuda=True)]
    start = time.time()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "CUDA_VISIBLE_DEVICES": first_gpu}
    )
    assert proc.returncode != 0
    assert "error: this node runs more ranks than its 1 GPU(s); use --nproc-per-node 1" in proc.stderr, proc.stderr
    assert time.time() - start < 120
