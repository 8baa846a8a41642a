"""Invalid-action masking: the same runs of ppo_discrete.py with and without masks, over seeds.

    python benchmark/masking_ablation.py           # Lock-v0 (below) and Taxi-v4, 3 seeds each, with and without
    python benchmark/masking_ablation.py --envs Taxi-v4 --seeds 5

Writes into <out>, by default docs/results/masking/ (the published results): results.md (steps until the mean
return of the last 100 episodes reaches the env's threshold, and the final return: the mean of the last 100
episodes, mean ± std over seeds), results.json and curves.png. Runs go one after another in this process.
"""

import json
import os
import sys
import tempfile
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import tyro

from common import RESULTS, load_script, rolling_mean

WINDOW = 100  # episodes in the rolling mean that the threshold and the final return are taken on


class Lock(gym.Env):
    """Open a combination lock of 8 digits in at most 50 presses, a button out of 10 at a time.

    At each stage 3 buttons are enabled (info["action_mask"]), one of them the stage's right digit: it
    moves on to the next stage (and opens the lock at the last, return 1); an enabled wrong one starts
    over; a disabled button does nothing. With masks the policy chooses among 3 buttons; without, it
    must also learn to avoid the 7 disabled ones.
    """

    COMBINATION = (3, 1, 4, 1, 5, 9, 2, 6)

    def __init__(self):
        self.observation_space = gym.spaces.Discrete(len(self.COMBINATION))  # the stage
        self.action_space = gym.spaces.Discrete(10)

    def enabled(self) -> np.ndarray:
        """The stage's right digit and 2 other buttons drawn at random."""
        right = self.COMBINATION[self.stage]
        others = self.np_random.choice([b for b in range(10) if b != right], 2, replace=False)
        mask = np.zeros(10, np.int8)
        mask[[right, *others]] = 1
        return mask

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.stage = 0
        self.mask = self.enabled()
        return self.stage, {"action_mask": self.mask}

    def step(self, action):
        opened = False
        if self.mask[action]:
            if action == self.COMBINATION[self.stage]:
                self.stage += 1
                opened = self.stage == len(self.COMBINATION)
                self.stage %= len(self.COMBINATION)
            else:
                self.stage = 0
        self.mask = self.enabled()
        return self.stage, float(opened), opened, False, {"action_mask": self.mask}


if "Lock-v0" not in gym.registry:
    gym.register("Lock-v0", entry_point=Lock, max_episode_steps=50)

# The budget of each env and the mean return that counts as learned.
ENVS = {
    "Lock-v0": dict(total_timesteps=100_000, threshold=0.9),
    "Taxi-v4": dict(total_timesteps=500_000, threshold=0.0),
}


@dataclass
class Args:
    envs: tuple[str, ...] = tuple(ENVS)
    """envs to run (Lock-v0, Taxi-v4)"""
    seeds: int = 3
    """seeds 1 to n, each with and without masks"""
    out: str = os.path.join(RESULTS, "masking")
    """folder for results.md, results.json and curves.png"""


def run(env_id: str, seed: int, masks: bool) -> dict:
    ppo = load_script("ppo_discrete")
    cwd = os.getcwd()
    os.chdir(tempfile.mkdtemp())  # a new folder for each run: the script refuses a run folder that exists
    try:
        result = ppo.train(
            ppo.Args(
                env_id=env_id,
                seed=seed,
                action_masks=masks,
                progress=False,
                checkpoint_minutes=0,
                total_timesteps=ENVS[env_id]["total_timesteps"],
                run_name="run",
            )
        )
    finally:
        os.chdir(cwd)
    episodes = result["episodes"]
    return {"steps": episodes["steps"], "returns": episodes["returns"]}


def steps_to(run: dict, threshold: float):
    """The env step at which the mean of the last WINDOW episode returns first reaches the threshold."""
    rolling = rolling_mean(run["returns"], WINDOW)[WINDOW - 1 :]
    hit = np.flatnonzero(rolling >= threshold)
    return None if len(hit) == 0 else int(run["steps"][hit[0] + WINDOW - 1])


def summarize(runs: dict) -> list[dict]:
    rows = []
    for (env_id, masks), group in runs.items():
        hits = [steps_to(r, ENVS[env_id]["threshold"]) for r in group]
        reached = [h for h in hits if h is not None]
        finals = [float(np.mean(r["returns"][-WINDOW:])) for r in group]
        rows.append(
            {
                "env_id": env_id,
                "masks": masks,
                "seeds": len(group),
                "threshold": ENVS[env_id]["threshold"],
                "steps_to_threshold": [h for h in hits],
                "reached": f"{len(reached)}/{len(group)}",
                "mean_steps_to_threshold": float(np.mean(reached)) if reached else None,
                "final_return_mean": float(np.mean(finals)),
                "final_return_std": float(np.std(finals)),
                "finals": finals,
            }
        )
    return rows


def plot(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(env for env, _ in runs))
    fig, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 3.8), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for masks in (True, False):
            group = runs.get((env, masks), [])
            if not group:
                continue
            end = min(r["steps"][-1] for r in group)
            grid = np.linspace(0, end, 200)
            ys = np.stack([np.interp(grid, r["steps"], rolling_mean(r["returns"], WINDOW)) for r in group])
            label = f"{'with' if masks else 'without'} masks ({len(group)} seeds)"
            ax.plot(grid, ys.mean(0), label=label)
            ax.fill_between(grid, ys.min(0), ys.max(0), alpha=0.2)
        ax.axhline(ENVS[env]["threshold"], ls=":", color="gray")
        ax.set_title(env, fontsize=10)
        ax.set_xlabel("env steps")
        ax.set_ylabel(f"return (rolling mean of {WINDOW})")
        ax.legend(fontsize=8)
    fig.suptitle("ppo_discrete.py with and without invalid-action masks; band: min-max over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_markdown(rows: list[dict], path: str) -> None:
    lines = [
        "# Invalid-action masking",
        "",
        f"Threshold: the mean return of the last {WINDOW} episodes. Final return: the mean of the last {WINDOW} "
        "episodes of a run, mean ± std (ddof 0) over seeds. Default options of ppo_discrete.py.",
        "",
        "| env | masks | seeds | steps to threshold (each seed) | mean steps to threshold | final return |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        each = ", ".join("-" if s is None else f"{s:,}" for s in r["steps_to_threshold"])
        mean = "-" if r["mean_steps_to_threshold"] is None else f"{r['mean_steps_to_threshold']:,.0f} ({r['reached']})"
        lines.append(
            f"| {r['env_id']} (>= {r['threshold']:g}) | {'on' if r['masks'] else 'off'} | {r['seeds']} | {each} | "
            f"{mean} | {r['final_return_mean']:.2f} ± {r['final_return_std']:.2f} |"
        )
    lines += ["", "![learning curves](curves.png)"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(args: Args) -> int:
    unknown = [e for e in args.envs if e not in ENVS]
    if unknown or args.seeds < 1:
        print(f"error: --envs takes {', '.join(ENVS)} and --seeds a positive integer", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    runs = {}
    for env_id in args.envs:
        for masks in (True, False):
            for seed in range(1, args.seeds + 1):
                r = run(env_id, seed, masks)
                runs.setdefault((env_id, masks), []).append(r)
                print(
                    f"{env_id} masks {'on ' if masks else 'off'} seed {seed}: final return "
                    f"{np.mean(r['returns'][-WINDOW:]):.2f}, reached the threshold at "
                    f"{steps_to(r, ENVS[env_id]['threshold'])}",
                    flush=True,
                )
    rows = summarize(runs)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    write_markdown(rows, os.path.join(args.out, "results.md"))
    plot(runs, os.path.join(args.out, "curves.png"))
    print(open(os.path.join(args.out, "results.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args, description=__doc__.split("\n")[0])))
