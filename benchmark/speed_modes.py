"""Steps per second of one script in each way of running it: the envs in this process or each in a process
of its own (--async-envs) or, ppo_atari.py, ale-py's threaded vector env (--env-backend ale-vector), eager or
compiled (--compile), fp32 or bfloat16 (--bf16, ppo_atari.py).

    python benchmark/speed_modes.py                                   # ppo_atari.py on Breakout, 20,480 steps a mode
    python benchmark/speed_modes.py --algo continuous --num-envs 16   # HalfCheetah-v5 with 16 envs
    python benchmark/speed_modes.py --cuda                            # the GPU table (below), about 4 minutes

Each mode is a run of the script in a process of its own, one after another, never two at once. Two rates
per run: over the whole run, and after the first update (which pays the compile time with --compile). The
table names the machine: compare rates only within one table.

--cuda measures the GPU table instead, and writes it to <out> (docs/results/speed-gpu/table.md) a row at a time, as
each is measured, so that a run cut short keeps the rows it measured: Breakout on the GPU eager and compiled, fp32 and
bf16, gymnasium's wrappers and ale-py's threads, with and without --lstm (a few updates each), then CartPole-v1 and
HalfCheetah-v5 on the GPU and on the CPU. No row starts after --minutes, and none runs past it.
"""

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from itertools import product
from typing import Optional

import tyro

from common import RESULTS, ROOT, load_script, python

SCRIPTS = {"atari": "ppo_atari", "continuous": "ppo_continuous", "discrete": "ppo_discrete"}


@dataclass
class Bench:
    algo: str = "atari"
    """which script: atari (Breakout), continuous (HalfCheetah-v5) or discrete (CartPole-v1)"""
    total_timesteps: int = 20_480
    """env steps per run"""
    num_envs: Optional[int] = None
    """envs per run (default: the script's)"""
    cuda: bool = False
    """measure the GPU table (every script on the GPU, Breakout in each mode) instead of --algo's modes"""
    bf16: bool = True
    """atari: also the modes with --bf16"""
    updates: int = 4
    """--cuda: updates per run (each of the script's default batch; --compile runs get 2 more for their compiling)"""
    minutes: float = 4.0
    """--cuda: no run starts, or goes on, after this many minutes; the rows not measured are listed as such"""
    quick: bool = False
    """--cuda: small batches (32 steps per env, 2 minibatches, 1 epoch) to try the table's machinery, not to measure"""
    out: str = os.path.join(RESULTS, "speed-gpu")
    """--cuda: the folder of table.md"""


def machine(cuda: bool) -> str:
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name = f"{cores} cores of {cpu}"
    if cuda:
        import torch

        name += f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU found"
    return name


def steady_rate(run_dir: str) -> Optional[float]:
    """Steps/s from the end of the first update to the end of the run, from the logged charts/SPS."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(run_dir)
    ea.Reload()
    sps = ea.Scalars("charts/SPS")
    if len(sps) < 3:
        return None
    (step1, rate1), (step2, rate2) = (sps[0].step, sps[0].value), (sps[-1].step, sps[-1].value)
    return (step2 - step1) / (step2 / rate2 - step1 / rate1)


def measure(script: str, total_timesteps: int, flags: list, timeout: Optional[float] = None) -> dict:
    """One run in a folder of its own: its two rates, or why there are none ("error")."""
    folder = tempfile.mkdtemp()  # a new folder for each run: the script refuses a run folder that exists
    cmd = python(
        os.path.join(ROOT, script + ".py"),
        "--total-timesteps",
        total_timesteps,
        "--run-name",
        "mode",
        "--no-progress",
        "--checkpoint-minutes",
        0,
        *flags,
    )
    # A session of its own, so that a run stopped at its time limit takes its envs' processes with it.
    proc = subprocess.Popen(
        cmd, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        err = proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"stopped at the time limit, after {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = err.strip().splitlines() or [f"exit status {proc.returncode}"]
        return {"error": lines[-1]}
    with open(os.path.join(folder, "runs", "mode", "summary.json")) as f:
        summary = json.load(f)
    return {"sps": summary["sps"], "steady": steady_rate(os.path.join(folder, "runs", "mode"))}


def run(bench: Bench, flags: list[str]) -> dict:
    envs = ["--num-envs", bench.num_envs] if bench.num_envs else []
    result = measure(SCRIPTS[bench.algo], bench.total_timesteps, envs + flags)
    if "error" in result:
        sys.exit(f"error: {' '.join(flags)} failed: {result['error']}")
    return result


# --- the GPU table (--cuda) ---------------------------------------------------------------------------------
QUICK = ["--num-steps", "32", "--num-minibatches", "2", "--update-epochs", "1"]


def gpu_rows() -> list[tuple[str, str, list[str]]]:
    """(env, script, options) of each row of the GPU table, in the order measured: the eager Breakout runs first,
    the compiled ones (mostly compiling, in runs this short) last."""
    breakout = {False: [], True: []}
    for compiled in (False, True):
        for lstm in (False, True):
            for backend in ("gymnasium", "ale-vector"):
                for bf16 in (False, True):
                    flags = ["--cuda", "--env-backend", backend]
                    flags += ["--bf16"] if bf16 else []
                    flags += ["--lstm"] if lstm else []
                    flags += ["--compile"] if compiled else []
                    breakout[compiled].append(("BreakoutNoFrameskip-v4", "ppo_atari", flags))
    others = [
        (env, script, [device])
        for env, script in (("CartPole-v1", "ppo_discrete"), ("HalfCheetah-v5", "ppo_continuous"))
        for device in ("--cuda", "--no-cuda")
    ]
    return breakout[False] + others + breakout[True]


def gpu_table(bench: Bench) -> int:
    """Measure the GPU table, writing each row to <out>/table.md as soon as it is measured."""
    import torch

    start = time.time()
    os.makedirs(bench.out, exist_ok=True)
    path = os.path.join(bench.out, "table.md")
    command = "python benchmark/speed_modes.py --cuda" + (" --quick" if bench.quick else "")
    sizes = "32 steps per env, 2 minibatches, 1 epoch: a try of the machinery, not a measurement" if bench.quick else ""
    head = [
        "# Steps per second on a GPU machine",
        "",
        f"{machine(True)}; torch {torch.__version__}; {date.today()}. `{command}`: {bench.updates} updates a run "
        f"of each script's default batch{' (' + sizes + ')' if sizes else ''}, {bench.updates + 2} with "
        "--compile; one run after another.",
        "",
        "| env | options | steps | steps/s, whole run | steps/s after the first update |",
        "|---|---|---|---|---|",
    ]
    with open(path, "w") as f:
        f.write("\n".join(head) + "\n")
    print("\n".join(head), flush=True)
    for env, script, flags in gpu_rows():
        defaults = load_script(script).Args()
        updates = bench.updates + (2 if "--compile" in flags else 0)
        steps = updates * defaults.num_envs * (32 if bench.quick else defaults.num_steps)
        left = 60 * bench.minutes - (time.time() - start)
        options = flags + ["--env-id", env] + (QUICK if bench.quick else [])
        result = measure(script, steps, options, timeout=left) if left > 1 else {"error": "not run (--minutes)"}
        if "error" in result:
            rates = f"{result['error']} | -"
        else:
            steady = "-" if result["steady"] is None else f"{result['steady']:,.0f}"
            rates = f"{result['sps']:,.0f} | {steady}"
        row = f"| {env} | `{' '.join(flags)}` | {steps:,} | {rates} |"
        with open(path, "a") as f:
            f.write(row + "\n")
        print(row, flush=True)
    return 0


def main(bench: Bench) -> int:
    if bench.algo not in SCRIPTS:
        print(f"error: --algo {bench.algo} is not one of {', '.join(SCRIPTS)}", file=sys.stderr)
        return 2
    if bench.cuda:
        return gpu_table(bench)
    device = ["--no-cuda"] if bench.algo == "atari" else []
    envs_modes = ["one process", "a process each"] + (["ale-vector threads"] if bench.algo == "atari" else [])
    modes = list(product(envs_modes, [False, True], [False, True] if bench.algo == "atari" and bench.bf16 else [False]))
    print(f"{SCRIPTS[bench.algo]}.py, {bench.total_timesteps:,} steps per run, on {machine(bench.cuda)}\n")
    rows = []
    for envs, compiled, bf16 in modes:
        flags = (
            device
            + {
                "one process": ["--no-async-envs"],
                "a process each": ["--async-envs"],
                "ale-vector threads": ["--env-backend", "ale-vector"],
            }[envs]
        )
        flags += ["--compile"] if compiled else []
        flags += ["--bf16"] if bf16 else []
        result = run(bench, flags)
        rows.append((envs, compiled, bf16, result))
        print(f"{' '.join(flags)}: {result['sps']:,.0f} steps/s", flush=True)
    print("\n| envs | network | precision | steps/s, whole run | steps/s after the first update |")
    print("|---|---|---|---|---|")
    for envs, compiled, bf16, r in rows:
        steady = "-" if r["steady"] is None else f"{r['steady']:,.0f}"
        print(
            f"| {envs} | {'compiled' if compiled else 'eager'} | "
            f"{'bf16' if bf16 else 'fp32'} | {r['sps']:,.0f} | {steady} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Bench, description=__doc__.split("\n")[0])))
