"""Does the order of the reward scaling show in returns? ppo_continuous.py's ScaleReward (the reference's order: add the
reward, update the statistics, restart the return at every episode end) against gymnasium's NormalizeReward order
(the return dropped one step early at a termination, carried through time-limit cuts), same seeds, one after another.

    python benchmark/reward_scaling.py                                   # Hopper-v5 and HalfCheetah-v5, 3 seeds, 300k
    python benchmark/reward_scaling.py --envs Hopper-v5 --seeds 1 --total-timesteps 50000

Writes docs/results/reward_scaling/results.md (final return: the mean of the last 100 episodes of each run).
"""

import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import tyro

from common import RESULTS, load_script


@dataclass
class Args:
    envs: tuple[str, ...] = ("Hopper-v5", "HalfCheetah-v5")
    """MuJoCo envs to compare on"""
    seeds: int = 3
    """seeds 1 to n for each env and order"""
    total_timesteps: int = 300_000
    """env steps per run"""
    jobs: int = 2
    """runs at the same time"""
    out: str = os.path.join(RESULTS, "reward_scaling")
    """where the report goes"""


def run(env_id: str, seed: int, order: str, total: int) -> dict:
    ppo = load_script("ppo_continuous")
    reference = ppo.ScaleReward.step
    if order == "gymnasium":  # NormalizeReward's own step in place of the reference order
        ppo.ScaleReward.step = ppo.gym.wrappers.vector.NormalizeReward.step
    os.chdir(tempfile.mkdtemp())  # a folder of its own per run
    try:
        result = ppo.train(ppo.Args(env_id=env_id, seed=seed, total_timesteps=total, progress=False, torch_threads=1))
    finally:
        ppo.ScaleReward.step = reference
    return {
        "env_id": env_id,
        "seed": seed,
        "order": order,
        "final_return": float(np.mean(result["episodes"]["returns"][-100:])),
    }


def main(args: Args) -> None:
    jobs = [
        (env, seed, order)
        for env in args.envs
        for seed in range(1, args.seeds + 1)
        for order in ("reference", "gymnasium")
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(run, *zip(*jobs), [args.total_timesteps] * len(jobs)))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "runs.json"), "w") as f:
        json.dump(runs, f, indent=1)
    lines = [
        f"# Reward scaling: the reference's order against gymnasium's ({args.total_timesteps:,} steps, seeds "
        f"1-{args.seeds})",
        "",
        "| env | reference order (ours) | gymnasium's order |",
        "|---|---|---|",
    ]
    for env in args.envs:
        cells = []
        for order in ("reference", "gymnasium"):
            finals = [r["final_return"] for r in runs if r["env_id"] == env and r["order"] == order]
            cells.append(f"{np.mean(finals):.1f} ± {np.std(finals):.1f} ({', '.join(f'{x:.0f}' for x in finals)})")
        lines.append(f"| {env} | {cells[0]} | {cells[1]} |")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))
