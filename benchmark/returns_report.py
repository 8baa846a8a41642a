"""Returns report from the runs' own files: final returns over seeds beside the published figures, and learning curves.

    python benchmark/returns_report.py docs/results/classic     # after python benchmark/returns.py classic

Reads <folder>/runs/*/summary.json and episodes.csv, and writes into <folder>: results.csv, results.md,
curves_steps.png (return against env steps) and curves_time.png (return against wall time).
Only finished runs count (every update of the budget done); the others are listed in results.md.
"""

import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import tyro

from common import REFERENCES, SUITES, rolling_mean

LAST = 100  # episodes averaged into a run's final return, as in the reference figures
SMOOTH = 100  # episodes in the rolling mean of the curves


@dataclass
class Run:
    name: str
    summary: dict
    steps: np.ndarray
    times: np.ndarray
    returns: np.ndarray

    @property
    def env_id(self) -> str:
        return self.summary["env_id"]

    @property
    def finished(self) -> bool:
        return self.summary["finished"]

    @property
    def final_return(self) -> float:
        return float(np.mean(self.returns[-LAST:])) if len(self.returns) else math.nan


# Student's t quantiles t(0.975, df) for a 95% interval of a mean from df + 1 seeds; beyond 30, the normal 1.96
# is within 4% of the exact value.
T_975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]
FEW_SEEDS = 5  # below this, say in the table that the interval is only a rough guide


def t_interval(values) -> tuple[float, float]:
    """95% Student's t interval of the mean of `values` (one per seed): mean +- t(0.975, n - 1) * s / sqrt(n).

    Valid for any n >= 2 when the seeds' results are roughly normal; with 2 to 4 seeds it is wide, honestly so
    (a percentile bootstrap over 3 seeds is never wider than the lowest to the highest seed, and covers the
    true mean far less than 95% of the time). None for fewer than 2 seeds.
    """
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return math.nan, math.nan
    t = T_975[len(v) - 2] if len(v) - 1 <= len(T_975) else 1.96
    half = t * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def interval_note(seeds: int) -> str:
    if seeds < 2:
        return "one seed: no interval"
    return f"{seeds} seeds: a rough guide" if seeds < FEW_SEEDS else ""


def read_episodes(path: str) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    cols = np.array(rows, dtype=float).reshape(len(rows), len(header))
    return {name: cols[:, i] for i, name in enumerate(header)}


def read_runs(runs_dir: str) -> tuple[list[Run], list[str]]:
    """The finished runs under runs_dir, and one line for each run folder left out."""
    runs, left_out = [], []
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        folder = os.path.join(runs_dir, name)
        if not os.path.isdir(folder):
            continue
        if not os.path.exists(os.path.join(folder, "summary.json")):
            left_out.append(f"{name}: no summary.json yet (still running, or killed before its end)")
            continue
        with open(os.path.join(folder, "summary.json")) as f:
            summary = json.load(f)
        ep = read_episodes(os.path.join(folder, "episodes.csv"))
        run = Run(name, summary, ep["global_step"], ep["time_s"], ep["return"])
        if run.finished:
            runs.append(run)
        else:
            left_out.append(f"{name}: stopped at step {summary['global_step']:,} of {summary['total_timesteps']:,}")
    return runs, left_out


def load_references(path: str = REFERENCES) -> dict[str, dict]:
    with open(path) as f:
        return json.load(f)["envs"]


def env_order(runs: list[Run], suite: Optional[str]) -> list[str]:
    """The suite's envs in its own order, then any others alphabetically."""
    present = {r.env_id for r in runs}
    known = [e for e in SUITES[suite].envs if e in present] if suite in SUITES else []
    return known + sorted(present - set(known))


def summarize(runs: list[Run], envs: list[str], references: dict[str, dict]) -> list[dict]:
    rows = []
    for env in envs:
        group = [r for r in runs if r.env_id == env]
        finals = [r.final_return for r in group if not math.isnan(r.final_return)]
        lo, hi = t_interval(finals)
        ref = references.get(env, {})
        rows.append(
            {
                "env_id": env,
                "seeds": len(group),
                # std with ddof 0, like the reference figures
                "final_return_mean": float(np.mean(finals)) if finals else math.nan,
                "final_return_std": float(np.std(finals)) if finals else math.nan,
                "ci95_low": lo,
                "ci95_high": hi,
                "wall_time_s": float(np.mean([r.summary["time_s"] for r in group])),
                "sps": float(np.mean([r.summary["sps"] for r in group])),
                "steps_per_run": int(np.mean([r.summary["global_step"] for r in group])),
                "total_steps": int(sum(r.summary["global_step"] for r in group)),
                "ref_env": ref.get("reference_env") or "",
                "ref_mean": ref.get("mean"),
                "ref_std": ref.get("std"),
                "ref_source": ref.get("source") or "",
            }
        )
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    def cell(x):
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return ""
        return round(x, 4) if isinstance(x, float) else x

    fields = (
        list(rows[0])
        if rows
        else [
            "env_id",
            "seeds",
            "final_return_mean",
            "final_return_std",
            "ci95_low",
            "ci95_high",
            "wall_time_s",
            "sps",
            "steps_per_run",
            "total_steps",
            "ref_env",
            "ref_mean",
            "ref_std",
            "ref_source",
        ]
    )
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=fields)
        out.writeheader()
        out.writerows({k: cell(v) for k, v in row.items()} for row in rows)


def write_markdown(rows: list[dict], left_out: list[str], references: dict[str, dict], title: str, path: str) -> None:
    def num(x, fmt=".2f"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    lines = [
        f"# {title}",
        "",
        f"Final return of a run: the mean of its last {LAST} episode returns. Over seeds: mean ± std (ddof 0, as the "
        f"reference figures) and a 95% Student's t interval of the mean (mean ± t(0.975, n - 1) s / sqrt(n)); with "
        f"fewer than {FEW_SEEDS} seeds the table says the interval is only a rough guide, and one seed has none. "
        "Wall time, steps/s and steps per run are means over seeds.",
        "",
    ]
    if rows:
        lines += [
            "| env | seeds | final return | 95% t interval | reference | wall time (s) | steps/s | steps per run "
            "| total steps |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            ref = "-" if r["ref_mean"] is None else f"{num(r['ref_mean'])} ± {num(r['ref_std'])} ({r['ref_env']})"
            interval = "-" if math.isnan(r["ci95_low"]) else f"[{num(r['ci95_low'])}, {num(r['ci95_high'])}]"
            if interval_note(r["seeds"]):
                interval += f" ({interval_note(r['seeds'])})"
            lines.append(
                f"| {r['env_id']} | {r['seeds']} | {num(r['final_return_mean'])} ± {num(r['final_return_std'])} | "
                f"{interval} | {ref} | {num(r['wall_time_s'], '.1f')} | "
                f"{num(r['sps'], ',.0f')} | {r['steps_per_run']:,} | {r['total_steps']:,} |"
            )
        sources = sorted(
            {
                (references[r["env_id"]]["source"], references[r["env_id"]]["url"])
                for r in rows
                if references.get(r["env_id"], {}).get("mean") is not None
            }
        )
        if sources:
            lines += [
                "",
                "References: mean ± std over 3 seeds of the final returns published for "
                + "; ".join(f"[{s}]({u})" for s, u in sources)
                + ". The reference env is in brackets.",
            ]
            lines += [
                f"- {r['env_id']}: {references[r['env_id']]['note']}"
                for r in rows
                if references.get(r["env_id"], {}).get("note")
            ]
        lines += [
            "",
            "![return against env steps](curves_steps.png)",
            "",
            "![return against wall time](curves_time.png)",
        ]
    else:
        lines.append("No finished runs yet.")
    if left_out:
        lines += ["", "Left out (not finished):", ""] + [f"- {x}" for x in left_out]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def curve(run: Run, x: str) -> tuple[np.ndarray, np.ndarray]:
    return (run.steps if x == "steps" else run.times), rolling_mean(run.returns, SMOOTH)


def plot_curves(runs: list[Run], envs: list[str], references: dict[str, dict], x: str, title: str, path: str) -> None:
    """One panel per env: mean over seeds of the smoothed return on a common grid, the min-max band over seeds,
    and the reference figure as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    longest = max((r.times[-1] for r in runs if len(r.times)), default=0.0)
    unit, scale = ("h", 3600.0) if longest > 3 * 3600 else ("min", 60.0) if longest > 180 else ("s", 1.0)
    cols = min(3, len(envs))
    rows = math.ceil(len(envs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows + 0.4), squeeze=False)
    for ax, env in zip(axes.flat, envs):
        curves = [curve(r, x) for r in runs if r.env_id == env and len(r.returns)]
        if curves:
            # Only the stretch that every seed covers, so the mean is never over a partial set of seeds.
            lo, hi = max(c[0][0] for c in curves), min(c[0][-1] for c in curves)
            grid = np.linspace(lo, hi, 200) if hi > lo else np.array([hi])
            ys = np.stack([np.interp(grid, cx, cy) for cx, cy in curves])
            gx = grid if x == "steps" else grid / scale
            ax.plot(gx, ys.mean(0), marker="o" if len(grid) == 1 else None, label=f"ours, mean of {len(curves)} seeds")
            ax.fill_between(gx, ys.min(0), ys.max(0), alpha=0.25, label="min-max over seeds")
        ref = references.get(env, {})
        if ref.get("mean") is not None:
            ax.axhline(ref["mean"], ls="--", color="gray", label=f"{ref['source']}: {ref['mean']:g}")
        ax.set_title(env, fontsize=10)
        ax.set_xlabel("env steps" if x == "steps" else f"wall time ({unit})")
        if x == "steps":
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_ylabel("episodic return")
        ax.legend(fontsize=7)
    for ax in axes.flat[len(envs) :]:
        ax.remove()
    fig.suptitle(
        f"{title}\nreturn: rolling mean of {SMOOTH} episodes; line: mean over seeds; band: min-max", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(folder: str, references: str = REFERENCES) -> list[dict]:
    """Write results.csv, results.md and the two plots into folder, from folder/runs/; returns the table's rows."""
    suite = os.path.basename(os.path.normpath(folder))
    refs = load_references(references)
    runs, left_out = read_runs(os.path.join(folder, "runs"))
    envs = env_order(runs, suite)
    rows = summarize(runs, envs, refs)
    title = f"Benchmark: {suite}"
    write_csv(rows, os.path.join(folder, "results.csv"))
    write_markdown(rows, left_out, refs, title, os.path.join(folder, "results.md"))
    if runs:
        for x in ("steps", "time"):
            plot_curves(runs, envs, refs, x, title, os.path.join(folder, f"curves_{x}.png"))
    return rows


@dataclass
class Args:
    folder: tyro.conf.Positional[str]
    """a suite's results folder, holding runs/ (e.g. docs/results/classic)"""
    references: str = REFERENCES
    """JSON file with the published figures to compare against"""


if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__.split("\n")[0])
    if not os.path.isdir(os.path.join(args.folder, "runs")):
        print(
            f"error: {args.folder} has no runs/ folder; pass a suite's results folder, e.g. docs/results/classic",
            file=sys.stderr,
        )
        sys.exit(2)
    write_report(args.folder, args.references)
    print(open(os.path.join(args.folder, "results.md")).read(), end="")
