"""Recurrent policies (--lstm) where the observation hides what the policy needs: the same runs with and without
--lstm, and sb3-contrib's RecurrentPPO side by side with the same hyperparameters where they map.

    python benchmark/recurrent.py                                  # every part, one run after another
    python benchmark/recurrent.py --parts cartpole --seeds 1 --total-timesteps 50000

Parts:
  cartpole  CartPoleNoVel-v1 (CartPole-v1 showing cart position and pole angle, not their velocities), 300k steps:
            ppo_discrete.py --lstm, ppo_discrete.py, and RecurrentPPO (MlpLstmPolicy), one right after the other
            for each seed.
  cartpole-solve  CartPoleNoVel-v1, 300k steps, the settings that solve it (SOLVE: --learning-rate 1e-3 --ent-coef 0)
            on ppo_discrete.py --lstm, and RecurrentPPO with the same settings where they map, one right after the
            other for each seed.
  pendulum  InvertedPendulumNoVel-v5 (InvertedPendulum-v5 without its velocities), 300k steps: ppo_continuous.py
            --lstm and without.
  breakout  BreakoutNoFrameskip-v4, seed 1, 262,144 steps (the README's feedforward run): ppo_atari.py --lstm
            --frame-stack 1, the reference's recurrent Atari setup.

Each run is a process of its own. Writes <out> (by default docs/results/recurrent/): results.md (final return: the
mean of the last 100 episodes; whole-run steps per second), results.json and curves.png.
Needs benchmark/requirements.txt (sb3-contrib, matplotlib) on top of requirements.txt.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import tyro

from common import RESULTS, SB3_DISCRETE, load_script, rolling_mean

WINDOW = 100  # episodes in the final return


class HideVelocities(gym.ObservationWrapper):
    """Keep only the observation entries `keep` (the positions): a memoryless policy cannot tell where things move."""

    def __init__(self, env: gym.Env, keep: list[int]):
        super().__init__(env)
        self.keep = keep
        space = env.observation_space
        self.observation_space = gym.spaces.Box(space.low[keep], space.high[keep], dtype=space.dtype)

    def observation(self, obs):
        return obs[self.keep]


def register_envs() -> None:
    if "CartPoleNoVel-v1" not in gym.registry:
        # CartPole: [x, x_dot, theta, theta_dot]; InvertedPendulum: [x, theta, x_dot, theta_dot].
        gym.register("CartPoleNoVel-v1", entry_point=lambda **kw: HideVelocities(gym.make("CartPole-v1", **kw), [0, 2]))
        gym.register(
            "InvertedPendulumNoVel-v5",
            entry_point=lambda **kw: HideVelocities(gym.make("InvertedPendulum-v5", **kw), [0, 1]),
        )


register_envs()

# The options under which ppo_discrete.py --lstm solves CartPoleNoVel-v1 within 300k steps (docs/recurrent.md): the
# defaults with a 4x learning rate (annealed to 0) and no entropy bonus.
SOLVE = dict(learning_rate=1e-3, ent_coef=0.0)

# ppo_discrete.py --lstm's defaults as RecurrentPPO's options.
SB3_DEFAULTS = dict(SB3_DISCRETE, lstm_hidden_size=128)

# The runs of each part: (name, worker, env, options). "ours": the script's defaults plus the options.
PARTS = {
    "cartpole": dict(
        env_id="CartPoleNoVel-v1",
        total_timesteps=300_000,
        runs=[
            ("ppo_discrete.py --lstm", "ours", dict(script="ppo_discrete", lstm=True)),
            ("ppo_discrete.py", "ours", dict(script="ppo_discrete")),
            # Our discrete defaults, mapped: 4 envs x 128 steps, 4 minibatches (of 128), 4 epochs, the same rates and
            # coefficients, 64-64 tanh heads, an LSTM of 128 for the actor and one for the critic (RecurrentPPO's
            # default, and ours); its rewards as the env gives them.
            ("RecurrentPPO (sb3-contrib)", "sb3", SB3_DEFAULTS),
        ],
    ),
    "cartpole-solve": dict(
        env_id="CartPoleNoVel-v1",
        total_timesteps=300_000,
        runs=[
            (
                "ppo_discrete.py --lstm --learning-rate 1e-3 --ent-coef 0",
                "ours",
                dict(script="ppo_discrete", lstm=True, **SOLVE),
            ),
            # Rewards scaled as ours (VecNormalize's reward normalization, what ScaleReward follows).
            (
                "RecurrentPPO (sb3-contrib), the same settings",
                "sb3",
                dict(SB3_DEFAULTS, learning_rate=1e-3, ent_coef=0.0, normalize=dict(norm_obs=False, norm_reward=True)),
            ),
        ],
    ),
    "pendulum": dict(
        env_id="InvertedPendulumNoVel-v5",
        total_timesteps=300_000,
        runs=[
            ("ppo_continuous.py --lstm", "ours", dict(script="ppo_continuous", lstm=True)),
            ("ppo_continuous.py", "ours", dict(script="ppo_continuous")),
        ],
    ),
    "breakout": dict(
        env_id="BreakoutNoFrameskip-v4",
        total_timesteps=262_144,
        seeds=[1],
        runs=[
            (
                "ppo_atari.py --lstm --frame-stack 1",
                "ours",
                dict(script="ppo_atari", lstm=True, frame_stack=1, cuda=False),
            ),
        ],
    ),
}


@dataclass
class Args:
    parts: tuple[str, ...] = tuple(PARTS)
    """parts to run (cartpole, cartpole-solve, pendulum, breakout)"""
    seeds: int = 3
    """seeds 1 to n for each run (breakout: seed 1 only)"""
    total_timesteps: Optional[int] = None
    """env steps per run (default: each part's own)"""
    out: str = os.path.join(RESULTS, "recurrent")
    """folder for results.md, results.json and curves.png"""
    job: Optional[str] = None
    """internal: run one job, given as JSON, and print its result"""


def run_ours(env_id: str, seed: int, total: int, options: dict) -> dict:
    options = dict(options)
    module = load_script(options.pop("script"))
    os.chdir(tempfile.mkdtemp())
    args = module.Args(
        env_id=env_id,
        seed=seed,
        total_timesteps=total,
        progress=False,
        checkpoint_minutes=0,
        run_name="bench",
        **options,
    )
    start = time.time()
    result = module.train(args)
    wall = time.time() - start
    return dict(
        steps=result["episodes"]["steps"],
        returns=result["episodes"]["returns"],
        wall=wall,
        global_step=result["global_step"],
    )


def run_sb3(env_id: str, seed: int, total: int, h: dict) -> dict:
    import torch
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    torch.set_num_threads(1)  # as ours (--torch-threads 1)
    os.chdir(tempfile.mkdtemp())
    episodes = dict(steps=[], returns=[])

    class Record(BaseCallback):
        def _on_step(self):
            for info in self.locals["infos"]:
                if "episode" in info:
                    episodes["steps"].append(self.num_timesteps)
                    episodes["returns"].append(float(info["episode"]["r"]))
            return True

    h, lr = dict(h), h["learning_rate"]
    h.pop("learning_rate")
    policy_kwargs = dict(
        net_arch=dict(pi=[64, 64], vf=[64, 64]),
        activation_fn=torch.nn.Tanh,
        lstm_hidden_size=h.pop("lstm_hidden_size"),
        **h.pop("policy", {}),  # which LSTM the critic reads (enable_critic_lstm, shared_lstm)
    )
    envs = make_vec_env(env_id, n_envs=h.pop("n_envs"), seed=seed)
    if "normalize" in h:  # VecNormalize's options, where ours scales rewards; episode returns stay the env's own
        envs = VecNormalize(envs, gamma=h["gamma"], **h.pop("normalize"))
    model = RecurrentPPO(
        "MlpLstmPolicy",
        envs,
        learning_rate=lambda remaining: lr * remaining,
        seed=seed,
        device="cpu",
        verbose=0,
        policy_kwargs=policy_kwargs,
        **h,
    )
    start = time.time()
    model.learn(total, callback=Record())
    wall = time.time() - start
    return dict(**episodes, wall=wall, global_step=int(model.num_timesteps))


def job(name: str, worker: str, env_id: str, seed: int, total: int, options: dict) -> dict:
    """One run, in a process of its own (a run's threads and memory do not carry into the next)."""
    spec = json.dumps(dict(worker=worker, env_id=env_id, seed=seed, total=total, options=options))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--job", spec], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"error: {name} (seed {seed}) failed:\n{out.stderr[-3000:]}")
    return dict(name=name, seed=seed, **json.loads(lines[-1][7:]))


def final(run: dict) -> float:
    return float(np.mean(run["returns"][-WINDOW:])) if run["returns"] else float("nan")


def speed(run: dict) -> Optional[float]:
    """Whole-run steps per second, or None for a run that shared the machine with other jobs."""
    return None if run.get("beside_other_jobs") else run["global_step"] / run["wall"]


def report(results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# Recurrent policies (`--lstm`) where the observation hides the velocities",
        "",
        "Final return: the mean of the last 100 training episodes of each run, mean ± std over seeds (each "
        "seed's in brackets). Steps/s: whole-run env steps per second (a run's steps over its wall time), the "
        "runs of a seed one right after the other on the same machine; runs that shared the machine with other "
        "jobs (marked beside_other_jobs in results.json) count for returns only.",
        "",
    ]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (part, runs) in zip(axes[0], results.items()):
        lines += [
            f"## {part}: {PARTS[part]['env_id']}, {runs[0]['global_step']:,} steps",
            "",
            "| run | final return | steps/s |",
            "|---|---|---|",
        ]
        names = list(dict.fromkeys(r["name"] for r in runs))
        for name in names:
            mine = [r for r in runs if r["name"] == name]
            finals = [final(r) for r in mine]
            sps = [speed(r) for r in mine if speed(r)]
            seeds = ", ".join(f"{f:.1f}" for f in finals)
            shown = f"{np.mean(sps):,.0f}" if sps else "(beside other jobs)"
            lines.append(f"| {name} | {np.mean(finals):.1f} ± {np.std(finals):.1f} ({seeds}) | {shown} |")
            for r in mine:
                if r["returns"]:
                    ax.plot(
                        r["steps"],
                        rolling_mean(r["returns"], WINDOW),
                        color=f"C{names.index(name)}",
                        label=name if r is mine[0] else None,
                        alpha=0.8,
                    )
        # Ours against RecurrentPPO, seed by seed, where both runs had the machine to themselves.
        theirs = {r["seed"]: speed(r) for r in runs if r["name"].startswith("RecurrentPPO") and speed(r)}
        pairs = [
            (speed(r), theirs[r["seed"]]) for r in runs if r["name"] == names[0] and speed(r) and r["seed"] in theirs
        ]
        if pairs:
            ratio = np.mean([a for a, _ in pairs]) / np.mean([b for _, b in pairs])
            lines += [
                "",
                f"{names[0]} / RecurrentPPO: {ratio:.2f}x steps per second "
                f"(per seed: {', '.join(f'{a / b:.2f}x' for a, b in pairs)}).",
            ]
        lines.append("")
        ax.set(title=PARTS[part]["env_id"], xlabel="env steps", ylabel=f"return (mean of last {WINDOW} episodes)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=80)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def main(args: Args) -> None:
    if args.job:
        spec = json.loads(args.job)
        run = run_ours if spec["worker"] == "ours" else run_sb3
        print("RESULT " + json.dumps(run(spec["env_id"], spec["seed"], spec["total"], spec["options"])))
        return
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    for part in args.parts:
        p = PARTS[part]
        total = args.total_timesteps or p["total_timesteps"]
        results[part] = []
        for seed in p.get("seeds", range(1, args.seeds + 1)):
            for name, worker, options in p["runs"]:
                run = job(name, worker, p["env_id"], seed, total, options)
                print(
                    f"{part} seed {seed}: {name}: final return {final(run):.1f}, "
                    f"{run['global_step'] / run['wall']:,.0f} steps/s",
                    flush=True,
                )
                results[part].append(run)
                with open(path, "w") as f:
                    json.dump(results, f)
    report({part: runs for part, runs in results.items() if runs}, args.out)


if __name__ == "__main__":
    main(tyro.cli(Args))
