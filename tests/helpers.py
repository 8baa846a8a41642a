"""Helpers shared by the tests: tiny environments with known values, and running a script as a user would."""

import os
import subprocess
import sys
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConstantEnv(gym.Env):
    """Observation always [0.], reward 1 per step; ends after `length` steps.

    Registered twice: ending by termination (the value of the state is then the discounted sum of the
    remaining rewards) and ending only by a time limit (the state is worth 1 / (1 - gamma): a cut
    episode must bootstrap).
    """

    def __init__(self, length: int = 1, terminate: bool = True, nan_after: int = -1, n_actions: int = 2,
                 obs_shape: tuple = (1,), continuous: bool = False):
        self.length, self.terminate, self.nan_after = length, terminate, nan_after
        self.observation_space = gym.spaces.Box(-1.0, 1.0, obs_shape, np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32) if continuous else gym.spaces.Discrete(n_actions)
        self.t = self.total = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(self.observation_space.shape, np.float32), {}

    def step(self, action):
        self.t += 1
        self.total += 1
        reward = float("nan") if 0 <= self.nan_after <= self.total else 1.0
        terminated = self.terminate and self.t >= self.length
        return np.zeros(self.observation_space.shape, np.float32), reward, terminated, False, {}


class ClockEnv(gym.Env):
    """Reward 1 per step, cut by a time limit; the observation is the time, [t / limit, 1 - t / limit], so
    an episode's final observation differs from every other, the next episode's first included."""

    def __init__(self, limit: int = 10, continuous: bool = False):
        self.limit = limit
        self.observation_space = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32) if continuous else gym.spaces.Discrete(2)

    def obs(self):
        return np.array([self.t / self.limit, 1 - self.t / self.limit], np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.obs(), {}

    def step(self, action):
        self.t += 1
        return self.obs(), 1.0, False, False, {}


class LevelEnv(gym.Env):
    """Never ends; each env draws a level u in [0, 1) at reset, from its own seed. Observation [u, t / 100],
    reward u whatever the action: envs seeded apart see different data."""

    def __init__(self, continuous: bool = False):
        self.observation_space = gym.spaces.Box(0.0, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32) if continuous else gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.level = 0, float(self.np_random.random())
        return np.array([self.level, 0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.level, self.t / 100], np.float32), self.level, False, False, {}


def register_test_envs() -> None:
    if "TestTerminate-v0" in gym.registry:
        return
    gym.register("TestLevels-v0", entry_point=LevelEnv)
    gym.register("TestLevelsContinuous-v0", entry_point=LevelEnv, kwargs={"continuous": True})
    gym.register("TestClock-v0", entry_point=ClockEnv, max_episode_steps=10)
    gym.register("TestClockContinuous-v0", entry_point=ClockEnv, kwargs={"continuous": True}, max_episode_steps=10)
    # Breakout cut by a time limit of 100 emulator frames (about 17 agent steps after the no-ops and FIRE).
    gym.register("TestBreakoutCut-v0", entry_point="ale_py.env:AtariEnv", max_episode_steps=100,
                 kwargs=dict(game="breakout", obs_type="rgb", frameskip=1, repeat_action_probability=0.0))
    gym.register("TestTerminate-v0", entry_point=ConstantEnv, kwargs={"length": 1, "terminate": True})
    gym.register("TestTruncate-v0", entry_point=ConstantEnv, kwargs={"length": 10, "terminate": False},
                 max_episode_steps=10)
    gym.register("TestNaN-v0", entry_point=ConstantEnv, kwargs={"length": 20, "nan_after": 3000})
    gym.register("TestImage-v0", entry_point=ConstantEnv, kwargs={"obs_shape": (8, 8, 3)})
    gym.register("TestContinuous-v0", entry_point=ConstantEnv, kwargs={"continuous": True})
    gym.register("TestContinuousNaN-v0", entry_point=ConstantEnv,
                 kwargs={"continuous": True, "length": 20, "nan_after": 3000})


def spaces(obs_space: gym.Space, action_space: gym.Space, mask_size: int = 0) -> SimpleNamespace:
    """What Agent(envs) reads of a vector env: the spaces of one of its envs (and, in ppo_discrete.py, the
    size of the action mask appended to the observations)."""
    return SimpleNamespace(single_observation_space=obs_space, single_action_space=action_space, mask_size=mask_size)


def box(*shape: int) -> gym.spaces.Box:
    return gym.spaces.Box(-np.inf, np.inf, shape, np.float32)


# The smallest run of each env family: a few seconds each.
TINY = {
    "ppo_discrete": dict(env_id="CartPole-v1", total_timesteps=512, num_envs=2, num_steps=64, num_minibatches=2),
    "ppo_continuous": dict(env_id="InvertedPendulum-v5", total_timesteps=512, num_envs=1, num_steps=128,
                           num_minibatches=2),
    "ppo_atari": dict(env_id="BreakoutNoFrameskip-v4", total_timesteps=128, num_envs=2, num_steps=32,
                      num_minibatches=2, cuda=False),
}


def tiny_args(ppo, **kw):
    """Args of the smallest run of the script's env family, one epoch per update, no progress display."""
    return ppo.Args(**{**TINY[ppo.SCRIPT], "update_epochs": 1, "progress": False, "run_name": "tiny", **kw})


def tiny_argv(ppo, **kw) -> list[str]:
    """The same run as command-line options."""
    argv = []
    for name, value in {**TINY[ppo.SCRIPT], "update_epochs": 1, "run_name": "tiny", **kw}.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag if value else flag.replace("--", "--no-", 1)] if isinstance(value, bool) else [flag, str(value)]
    return argv + ["--no-progress"]


def run_script(script: str, *args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """Run `python <script> args...` in the current folder, as a user would."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=timeout, **popen)


def same_params(a: dict, b: dict) -> bool:
    """Two state dicts hold bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_bad_input(main, argv: list, expected: str, capsys) -> None:
    """main(argv) refuses before training: exit status 2 and one line on stderr that names the problem."""
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err, err
