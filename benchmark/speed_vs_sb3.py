"""Speed benchmark: steps/s and wall time to a return threshold, ours side by side with Stable-Baselines3.

    pip install -r benchmark/requirements.txt
    python benchmark/speed_vs_sb3.py                  # ppo_discrete.py vs SB3 on CartPole-v1, seeds 1 2 3
    python benchmark/speed_vs_sb3.py --algo continuous --seeds 1 --total-timesteps 100000

Both implementations get the same hyperparameters and one torch thread. Runs go one after another,
each in its own process, so they never compete for the machine's cores. The table is printed, and the
numbers behind it go to <out>/speed-<algo>-<env_id>.json (by default docs/results/speed_vs_sb3/).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import tyro

from common import RESULTS, SB3_DISCRETE, SUITES, load_script, python, rolling_mean

# One entry per script: the env, the budget, the return that counts as solved, and the matching SB3 setup.
CONFIGS = {
    "discrete": dict(
        script=SUITES["classic"].script,
        env_id="CartPole-v1",
        total_timesteps=SUITES["classic"].total_timesteps,
        threshold=475.0,
        window=20,
        sb3=dict(SB3_DISCRETE, net=[64, 64], normalize=False),
    ),
    "continuous": dict(
        script=SUITES["mujoco"].script,
        env_id="HalfCheetah-v5",
        total_timesteps=SUITES["mujoco"].total_timesteps,
        threshold=1000.0,
        window=10,
        sb3=dict(
            n_envs=1,
            n_steps=2048,
            batch_size=64,
            n_epochs=10,
            learning_rate=3e-4,
            gamma=0.99,
            gae_lambda=0.95,
            clip_range=0.2,
            clip_range_vf=0.2,
            ent_coef=0.0,
            vf_coef=0.5,
            max_grad_norm=0.5,
            net=[64, 64],
            normalize=True,
            policy_kwargs=dict(log_std_init=0.0),
        ),
    ),
    # Atari: SB3's AtariWrapper does the same preprocessing (no-ops, skip 4 with max, life loss as the end
    # for learning, FIRE reset, sign-clipped rewards, 84x84 gray) and VecFrameStack stacks 4 frames.
    "atari": dict(
        script=SUITES["atari"].script,
        env_id="BreakoutNoFrameskip-v4",
        total_timesteps=SUITES["atari"].total_timesteps,
        threshold=None,
        window=20,
        ours=dict(cuda=False),
        sb3=dict(
            n_envs=8,
            n_steps=128,
            batch_size=256,
            n_epochs=4,
            learning_rate=2.5e-4,
            gamma=0.99,
            gae_lambda=0.95,
            clip_range=0.1,
            clip_range_vf=0.1,
            ent_coef=0.01,
            vf_coef=0.5,
            max_grad_norm=0.5,
            atari=True,
            normalize=False,
        ),
    ),
}


@dataclass
class Bench:
    algo: str = "discrete"
    """which script to benchmark: discrete (CartPole-v1), continuous (HalfCheetah-v5) or atari (Breakout)"""
    env_id: Optional[str] = None
    """env to run instead of the script's default (e.g. PongNoFrameskip-v4)"""
    bf16: bool = False
    """atari only: also pass --bf16 to ours"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds to run, one after another"""
    total_timesteps: Optional[int] = None
    """budget per run (default: the script's default)"""
    sb3: bool = True
    """also run Stable-Baselines3 with the same hyperparameters"""
    out: str = os.path.join(RESULTS, "speed_vs_sb3")
    """folder for the JSON results"""
    worker: Optional[str] = None
    """internal: run one job (ours or sb3) and print its result as JSON"""
    seed: int = 1
    """internal: the worker's seed"""


def time_to_threshold(steps, times, returns, threshold, window):
    """Wall time and steps when the mean of the last `window` episode returns first reaches `threshold`."""
    r = np.asarray(returns, dtype=float)
    if threshold is None or len(r) < window:
        return None, None
    rolling = rolling_mean(r, window)[window - 1 :]
    hit = np.nonzero(rolling >= threshold)[0]
    if len(hit) == 0:
        return None, None
    i = hit[0] + window - 1
    return float(times[i]), int(steps[i])


def run_ours(cfg: dict, seed: int, total: int) -> dict:
    module = load_script(cfg["script"])
    os.chdir(tempfile.mkdtemp())  # a new folder for each run: the script refuses a run folder that exists
    args = module.Args(
        env_id=cfg["env_id"],
        seed=seed,
        total_timesteps=total,
        progress=False,
        run_name=f"bench-{seed}",
        **cfg.get("ours", {}),
    )
    start = time.time()
    result = module.train(args)
    wall = time.time() - start
    ep = result["episodes"]
    return dict(
        steps=ep["steps"], times=ep["times"], returns=ep["returns"], wall=wall, global_step=result["global_step"]
    )


def run_sb3(cfg: dict, seed: int, total: int) -> dict:
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    h = cfg["sb3"]
    torch.set_num_threads(torch.get_num_threads() if h.get("atari") else 1)  # the same threads as ours
    os.chdir(tempfile.mkdtemp())
    if h.get("atari"):
        import ale_py
        import gymnasium
        from stable_baselines3.common.env_util import make_atari_env
        from stable_baselines3.common.vec_env import VecFrameStack

        gymnasium.register_envs(ale_py)

        env = VecFrameStack(make_atari_env(cfg["env_id"], n_envs=h["n_envs"], seed=seed), 4)
    else:
        env = make_vec_env(cfg["env_id"], n_envs=h["n_envs"], seed=seed)
    if h["normalize"]:
        env = VecNormalize(env, gamma=h["gamma"])
    episodes = dict(steps=[], times=[], returns=[])

    class Record(BaseCallback):
        def _on_training_start(self):
            self.t0 = time.time()

        def _on_step(self):
            for info in self.locals["infos"]:
                if "episode" in info:
                    episodes["steps"].append(self.num_timesteps)
                    episodes["times"].append(time.time() - self.t0)
                    episodes["returns"].append(float(info["episode"]["r"]))
            return True

    lr = h["learning_rate"]
    policy = "CnnPolicy" if h.get("atari") else "MlpPolicy"
    net = {} if h.get("atari") else dict(net_arch=dict(pi=h["net"], vf=h["net"]), activation_fn=torch.nn.Tanh)
    model = PPO(
        policy,
        env,
        learning_rate=lambda remaining: lr * remaining,
        n_steps=h["n_steps"],
        batch_size=h["batch_size"],
        n_epochs=h["n_epochs"],
        gamma=h["gamma"],
        gae_lambda=h["gae_lambda"],
        clip_range=h["clip_range"],
        clip_range_vf=h["clip_range_vf"],
        ent_coef=h["ent_coef"],
        vf_coef=h["vf_coef"],
        max_grad_norm=h["max_grad_norm"],
        seed=seed,
        device="cpu",
        verbose=0,
        policy_kwargs=dict(**net, **h.get("policy_kwargs", {})),
    )
    start = time.time()
    model.learn(total, callback=Record())
    wall = time.time() - start
    return dict(**episodes, wall=wall, global_step=int(model.num_timesteps))


def summarize(name: str, runs: list[dict], cfg: dict) -> dict:
    sps = [r["global_step"] / r["wall"] for r in runs]
    hits = [time_to_threshold(r["steps"], r["times"], r["returns"], cfg["threshold"], cfg["window"]) for r in runs]
    times = [t for t, _ in hits if t is not None]
    finals = [float(np.mean(r["returns"][-cfg["window"] :])) if r["returns"] else float("nan") for r in runs]
    return dict(
        name=name,
        sps=float(np.mean(sps)),
        wall=float(np.mean([r["wall"] for r in runs])),
        time_to_threshold=float(np.mean(times)) if times else None,
        steps_to_threshold=float(np.mean([s for _, s in hits if s is not None])) if times else None,
        reached=f"{len(times)}/{len(runs)}",
        final_return=float(np.mean(finals)),
    )


def main(bench: Bench) -> None:
    if bench.algo not in CONFIGS:
        sys.exit(f"error: --algo {bench.algo} is not one of {', '.join(CONFIGS)}")
    cfg = dict(CONFIGS[bench.algo])
    if bench.env_id:
        cfg["env_id"] = bench.env_id
    if bench.bf16:
        cfg["ours"] = {**cfg.get("ours", {}), "bf16": True}
    total = bench.total_timesteps or cfg["total_timesteps"]
    if bench.worker:
        result = (run_ours if bench.worker == "ours" else run_sb3)(cfg, bench.seed, total)
        print("RESULT " + json.dumps(result))
        return

    impls = ["ours"] + (["sb3"] if bench.sb3 else [])
    results: dict[str, list[dict]] = {impl: [] for impl in impls}
    for seed in bench.seeds:
        for impl in impls:
            cmd = python(
                os.path.abspath(__file__),
                "--algo",
                bench.algo,
                "--worker",
                impl,
                "--seed",
                seed,
                "--total-timesteps",
                total,
                "--env-id",
                cfg["env_id"],
                *(["--bf16"] if bench.bf16 else []),
            )
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                sys.exit(f"error: {impl} seed {seed} failed:\n{out.stderr[-2000:]}")
            results[impl].append(json.loads(line[0][len("RESULT ") :]))
            r = results[impl][-1]
            print(f"{impl:5s} seed {seed}: {r['global_step'] / r['wall']:,.0f} steps/s, {r['wall']:.1f} s", flush=True)

    rows = [summarize(impl, results[impl], cfg) for impl in impls]
    print(
        f"\n{cfg['env_id']}, {total:,} steps, seeds {list(bench.seeds)}; threshold: mean of the last "
        f"{cfg['window']} episode returns >= {cfg['threshold']}\n"
    )
    print(
        "| implementation | steps/s | whole run (s) | time to threshold (s) | steps to threshold | reached "
        "| final return |"
    )
    print("|---|---|---|---|---|---|---|")
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for r in rows:
        print(
            f"| {r['name']} | {r['sps']:,.0f} | {r['wall']:.1f} | {fmt(r['time_to_threshold'], '.1f')} | "
            f"{fmt(r['steps_to_threshold'], ',.0f')} | {r['reached']} | {r['final_return']:.1f} |"
        )
    if bench.sb3:
        ours, sb3 = rows
        print(
            f"\nours / SB3: {ours['sps'] / sb3['sps']:.2f}x steps/s, "
            f"{sb3['wall'] / ours['wall']:.2f}x faster whole run",
            end="",
        )
        if ours["time_to_threshold"] and sb3["time_to_threshold"]:
            print(f", {sb3['time_to_threshold'] / ours['time_to_threshold']:.2f}x faster to the threshold", end="")
        print()
    os.makedirs(bench.out, exist_ok=True)
    with open(os.path.join(bench.out, f"speed-{bench.algo}-{cfg['env_id'].replace('/', '-')}.json"), "w") as f:
        json.dump({"rows": rows, "runs": results, "total_timesteps": total, "seeds": list(bench.seeds)}, f)


if __name__ == "__main__":
    main(tyro.cli(Bench))
