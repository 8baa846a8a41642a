"""What the benchmarks share: where the scripts are, the suites of envs, and small helpers."""

import importlib
import os
import sys
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")  # published results: the benchmarks write there unless told --out
REFERENCES = os.path.join(ROOT, "benchmark", "references.json")

# ppo_discrete.py's defaults as Stable-Baselines3's PPO options (sb3-contrib's RecurrentPPO takes the same ones).
SB3_DISCRETE = dict(
    n_envs=4,
    n_steps=128,
    batch_size=128,
    n_epochs=4,
    learning_rate=2.5e-4,
    gamma=0.99,
    gae_lambda=0.95,
    clip_range=0.2,
    clip_range_vf=0.2,
    ent_coef=0.01,
    vf_coef=0.5,
    max_grad_norm=0.5,
)


@dataclass(frozen=True)
class Suite:
    script: str
    """module name of the training script, e.g. ppo_discrete"""
    envs: tuple[str, ...]
    """gymnasium ids, in the order of the report"""
    total_timesteps: int
    """env steps per run"""
    checkpoint_every: int
    """updates between checkpoints: a few minutes of work at most is lost when a suite is stopped"""


SUITES = {
    "classic": Suite(
        "ppo_discrete", ("CartPole-v1", "Acrobot-v1", "MountainCar-v0", "LunarLander-v3"), 500_000, checkpoint_every=50
    ),
    "mujoco": Suite(
        "ppo_continuous",
        ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "InvertedPendulum-v5"),
        1_000_000,
        checkpoint_every=10,
    ),
    "atari": Suite(
        "ppo_atari",
        ("BreakoutNoFrameskip-v4", "PongNoFrameskip-v4", "BeamRiderNoFrameskip-v4"),
        10_000_000,
        checkpoint_every=100,
    ),
}


def script_path(script: str) -> str:
    return os.path.join(ROOT, script + ".py")


def python(path: str, *args) -> list[str]:
    """The command line that runs a Python file with this interpreter."""
    return [sys.executable, path, *map(str, args)]


def load_script(script: str):
    """Import a training script as a module (for its Args and train())."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return importlib.import_module(script)


def run_name(env_id: str, seed: int) -> str:
    return f"{env_id}__{seed}".replace("/", "-")


def rolling_mean(x, window: int) -> np.ndarray:
    """Trailing mean of the last `window` values; the first window - 1 entries average what there is so far."""
    x = np.asarray(x, dtype=float)
    sums = np.convolve(x, np.ones(window))[: len(x)]
    return sums / np.minimum(np.arange(1, len(x) + 1), window)
