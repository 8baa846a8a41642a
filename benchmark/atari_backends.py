"""ppo_atari.py with each env backend at the same budget: does ale-py's threaded vector env (--env-backend ale-vector)
learn as the reference preprocessing (gymnasium's wrappers) does, and how much faster does it run?

    python benchmark/atari_backends.py                       # Breakout, 262,144 steps, seed 1, both backends
    python benchmark/atari_backends.py --seeds 1 2 3 --total-timesteps 1000000 --cuda

The runs go one after another, each in a process of its own, never two at once. Writes <out> (by default
docs/results/atari_backends/): results.md (final return: the mean of the last 100 episodes; whole-run steps per
second), results.json and curves.png.
"""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import tyro

from common import RESULTS, ROOT, python, rolling_mean
from speed_modes import machine

BACKENDS = ("gymnasium", "ale-vector")
WINDOW = 100


@dataclass
class Args:
    env_id: str = "BreakoutNoFrameskip-v4"
    """the game"""
    seeds: tuple[int, ...] = (1,)
    """seeds, each run with both backends one right after the other"""
    total_timesteps: int = 262_144
    """env steps per run (the README's feedforward Breakout budget)"""
    cuda: bool = False
    """run the network on the GPU"""
    out: str = os.path.join(RESULTS, "atari_backends")
    """folder for results.md, results.json and curves.png"""


def run(args: Args, backend: str, seed: int) -> dict:
    folder = tempfile.mkdtemp()  # a new folder for each run: the script refuses a run folder that exists
    cmd = python(
        os.path.join(ROOT, "ppo_atari.py"),
        "--env-id",
        args.env_id,
        "--env-backend",
        backend,
        "--seed",
        seed,
        "--total-timesteps",
        args.total_timesteps,
        "--run-name",
        "run",
        "--no-progress",
        "--checkpoint-minutes",
        0,
        "--cuda" if args.cuda else "--no-cuda",
    )
    out = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: {backend} (seed {seed}) failed:\n{out.stderr[-2000:]}")
    with open(os.path.join(folder, "runs", "run", "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(folder, "runs", "run", "episodes.csv")) as f:
        rows = [line.split(",") for line in f.read().splitlines()[1:]]
    return dict(
        backend=backend,
        seed=seed,
        sps=summary["sps"],
        final=summary["final_return"],
        steps=[int(r[0]) for r in rows],
        returns=[float(r[2]) for r in rows],
    )


def main(args: Args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    runs = []
    for seed in args.seeds:
        for backend in BACKENDS:
            runs.append(run(args, backend, seed))
            print(
                f"seed {seed}, {backend}: final return {runs[-1]['final']:.2f}, {runs[-1]['sps']:,.0f} steps/s",
                flush=True,
            )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(runs, f)
    lines = [
        f"# ppo_atari.py: each env backend on {args.env_id}, {args.total_timesteps:,} steps",
        "",
        f"One run after the other on {machine(args.cuda)}; final return: the mean of the last {WINDOW} episodes "
        "(the game score over all lives), steps/s over the whole run.",
        "",
        "| backend | seed | final return | episodes | steps/s |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['backend']} | {r['seed']} | {r['final']:.2f} | {len(r['returns'])} | {r['sps']:,.0f} |" for r in runs
    ]
    sps = {b: np.mean([r["sps"] for r in runs if r["backend"] == b]) for b in BACKENDS}
    lines += ["", f"ale-vector / gymnasium: {sps['ale-vector'] / sps['gymnasium']:.2f}x steps per second.", ""]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        ax.plot(
            r["steps"],
            rolling_mean(r["returns"], WINDOW),
            color=f"C{BACKENDS.index(r['backend'])}",
            label=f"{r['backend']} (seed {r['seed']})",
        )
    ax.set(title=args.env_id, xlabel="env steps", ylabel=f"return (mean of the last {WINDOW} episodes)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "curves.png"), dpi=80)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n")[0]))
