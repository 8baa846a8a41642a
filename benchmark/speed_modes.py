"""Steps per second of one script in each way of running it: the envs in this process or each in a process
of its own (--async-envs) or, ppo_atari.py, ale-py's threaded vector env (--env-backend ale-vector), eager or
compiled (--compile), fp32 or bfloat16 (--bf16, ppo_atari.py).

    python benchmark/speed_modes.py                                   # ppo_atari.py on Breakout, 20,480 steps a mode
    python benchmark/speed_modes.py --cuda --total-timesteps 102400   # the same on a GPU machine
    python benchmark/speed_modes.py --algo continuous --num-envs 16   # HalfCheetah-v5 with 16 envs

Each mode is a run of the script in a process of its own, one after another, never two at once. Two rates
per run: over the whole run, and after the first update (which pays the compile time with --compile). The
table names the machine: compare rates only within one table.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from itertools import product
from typing import Optional

import tyro

from common import ROOT, python

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
    """run the network on the GPU (ppo_atari.py's default when there is one)"""
    bf16: bool = True
    """atari: also the modes with --bf16"""


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


def run(bench: Bench, flags: list[str]) -> dict:
    folder = tempfile.mkdtemp()  # a new folder for each mode: the script refuses a run folder that exists
    cmd = python(
        os.path.join(ROOT, SCRIPTS[bench.algo] + ".py"),
        "--total-timesteps",
        bench.total_timesteps,
        "--run-name",
        "mode",
        "--no-progress",
        "--checkpoint-minutes",
        0,
        *(["--num-envs", bench.num_envs] if bench.num_envs else []),
        *flags,
    )
    out = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: {' '.join(flags)} failed:\n{out.stderr[-2000:]}")
    with open(os.path.join(folder, "runs", "mode", "summary.json")) as f:
        summary = json.load(f)
    return {"sps": summary["sps"], "steady": steady_rate(os.path.join(folder, "runs", "mode"))}


def main(bench: Bench) -> int:
    if bench.algo not in SCRIPTS:
        print(f"error: --algo {bench.algo} is not one of {', '.join(SCRIPTS)}", file=sys.stderr)
        return 2
    device = ["--cuda"] if bench.cuda else (["--no-cuda"] if bench.algo == "atari" else [])
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
