"""What the tests share: tiny environments with known values, the smallest run of each script, running a script as a
user would, and reading what a run wrote."""

import os
import subprocess
import sys
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["ppo_discrete", "ppo_continuous", "ppo_atari"]


# ----------------------------------------------------------------------------------------------------
# Environments with known values
# ----------------------------------------------------------------------------------------------------
def action_space(continuous: bool) -> gym.Space:
    return gym.spaces.Box(-1.0, 1.0, (1,), np.float32) if continuous else gym.spaces.Discrete(2)


class ConstantEnv(gym.Env):
    """Observation always 0, reward 1 per step; the episode ends after `length` steps, by termination (the state
    is then worth the discounted sum of the rewards left) or by a time limit alone (then it is worth 1 / (1 - gamma),
    and a cut episode must bootstrap). nan_after: the reward turns NaN after that many steps in all."""

    def __init__(self, length=1, terminate=True, nan_after=-1, obs_shape=(1,), continuous=False):
        self.length, self.terminate, self.nan_after = length, terminate, nan_after
        self.observation_space = gym.spaces.Box(-1.0, 1.0, obs_shape, np.float32)
        self.action_space = action_space(continuous)
        self.t = self.total = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(self.observation_space.shape, np.float32), {}

    def step(self, action):
        self.t += 1
        self.total += 1
        reward = float("nan") if 0 <= self.nan_after <= self.total else 1.0
        return (
            np.zeros(self.observation_space.shape, np.float32),
            reward,
            self.terminate and self.t >= self.length,
            False,
            {},
        )


class ClockEnv(gym.Env):
    """Reward 1 per step, cut by a time limit; the observation is the time, [t / limit, 1 - t / limit], so an
    episode's final observation differs from every other, the next episode's first included."""

    def __init__(self, limit=10, continuous=False):
        self.limit = limit
        self.observation_space = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
        self.action_space = action_space(continuous)

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
    """Never ends; each env draws a level u in [0, 1) at reset, from its own seed. Observation [u, t / 100], reward u
    whatever the action: envs seeded apart see different data."""

    def __init__(self, continuous=False):
        self.observation_space = gym.spaces.Box(0.0, np.inf, (2,), np.float32)
        self.action_space = action_space(continuous)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.level = 0, float(self.np_random.random())
        return np.array([self.level, 0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.level, self.t / 100], np.float32), self.level, False, False, {}


class FaultyEnv(ConstantEnv):
    """A ConstantEnv (10-step episodes) that misbehaves after `after` steps in all: raises (crash), or returns an
    observation of another shape (shape) or a NaN observation (nan)."""

    after = 300

    def __init__(self, fault="crash", continuous=False):
        super().__init__(length=10, continuous=continuous)
        self.fault = fault

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        if self.total > self.after:
            if self.fault == "crash":
                raise RuntimeError("the env's own bug")
            obs = np.zeros(3, np.float32) if self.fault == "shape" else np.full_like(obs, np.nan)
        return obs, reward, terminated, truncated, info


N_OBS = 3


class StrictMaskEnv(gym.Env):
    """Random action masks, and an error on any action the mask forbids: a run that trains on it without an error
    sampled only valid actions. Reward 1 for the lowest valid option of every dimension. empty_final: the final
    observation of an episode allows no action, as a game over does. start: the actions start there (Discrete). Not
    strict: any action is taken."""

    def __init__(
        self,
        nvec=(5,),
        dict_obs=False,
        empty_mask=False,
        empty_final=False,
        start=0,
        masks_at_reset=True,
        strict=True,
        episode=10,
    ):
        self.nvec, self.dict_obs, self.empty_mask, self.empty_final = list(nvec), dict_obs, empty_mask, empty_final
        self.start, self.masks_at_reset, self.strict, self.episode = start, masks_at_reset, strict, episode
        self.action_space = (
            gym.spaces.Discrete(nvec[0], start=start)
            if len(nvec) == 1
            else gym.spaces.MultiDiscrete(nvec, start=[start] * len(nvec))
        )
        vector = gym.spaces.Box(-1.0, 1.0, (N_OBS,), np.float32)
        mask_space = gym.spaces.MultiBinary(sum(self.nvec))
        self.observation_space = gym.spaces.Dict({"obs": vector, "action_mask": mask_space}) if dict_obs else vector

    def new_mask(self):
        groups = []
        for n in self.nvec:
            group = self.np_random.random(n) < 0.4
            group[self.np_random.integers(n)] = True  # at least one valid option per dimension
            groups.append(group)
        self.mask = np.concatenate(groups).astype(np.int8)
        if self.empty_mask or (self.empty_final and self.t >= self.episode):
            self.mask[:] = 0
        vector = np.concatenate([[self.t / self.episode], self.mask[: N_OBS - 1]]).astype(np.float32)
        return ({"obs": vector, "action_mask": self.mask} if self.dict_obs else vector), {"action_mask": self.mask}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        obs, info = self.new_mask()
        return obs, ({} if self.dict_obs or not self.masks_at_reset else info)

    def step(self, action):
        action = np.atleast_1d(action) - self.start
        start, reward = 0, 0.0
        for a, n in zip(action, self.nvec):
            assert 0 <= a < n, f"action {a + self.start} not in the action space"
            group = self.mask[start : start + n]
            assert group[a] or not self.strict, f"invalid action {a} of {n} under mask {group}"
            reward += float(a == np.flatnonzero(group)[0])
            start += n
        self.t += 1
        obs, info = self.new_mask()
        return obs, reward, self.t >= self.episode, False, ({} if self.dict_obs else info)


class CueEnv(gym.Env):
    """Episodes of 3 steps, whose first observation is a cue and the rest 0. The first episode after a seeded reset
    shows 1 for an odd seed and -1 for an even one, every later episode 0.5: envs seeded apart differ only in what
    their first episode showed, so from the second episode on a memory that crosses no episode's end sees the same.
    image: the observation is that many 84x84 uint8 frames (cue 1, -1, 0.5, 0 -> 255, 64, 128, 0), one life.
    lives: the game's lives (info["lives"], as ALE's); each but the last is lost at its 4th step, without the episode
    ending, and the next life starts with 0.5: from the second life on, a memory that crosses no lost life sees the
    same in every env, as from the second episode on."""

    def __init__(self, continuous=False, image=0, lives=1):
        self.image, self.lives_per_game = image, lives
        self.observation_space = (
            gym.spaces.Box(0, 255, (image, 84, 84), np.uint8) if image else gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        )
        self.action_space = gym.spaces.Discrete(4) if image else action_space(continuous)

    def obs(self, cue):
        if self.image:
            return np.full(self.observation_space.shape, {1.0: 255, -1.0: 64, 0.5: 128, 0.0: 0}[cue], np.uint8)
        return np.array([cue], np.float32)

    def lives(self):
        return self.left

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.left = 0, self.lives_per_game
        return self.obs(0.5 if seed is None else 1.0 if seed % 2 else -1.0), {"lives": self.left}

    def step(self, action):
        self.t += 1
        if self.left > 1 and self.t == 4:  # a life lost; the next one starts
            self.t, self.left = 0, self.left - 1
            return self.obs(0.5), 1.0, False, False, {"lives": self.left}
        return self.obs(0.0), 1.0, self.left == 1 and self.t >= 3, False, {"lives": self.left}


class UnboundedEnv(ConstantEnv):
    def __init__(self):
        super().__init__(length=5, continuous=True)
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)


def register_test_envs() -> None:
    if "TestTerminate-v0" in gym.registry:
        return
    for continuous in (False, True):
        c = "Continuous" if continuous else ""
        gym.register(f"TestLevels{c}-v0", entry_point=LevelEnv, kwargs={"continuous": continuous})
        gym.register(f"TestClock{c}-v0", entry_point=ClockEnv, kwargs={"continuous": continuous}, max_episode_steps=10)
        gym.register(f"TestTerminate{c}-v0", entry_point=ConstantEnv, kwargs={"continuous": continuous})
        gym.register(
            f"TestNaN{c}-v0",
            entry_point=ConstantEnv,
            kwargs={"length": 20, "nan_after": 3000, "continuous": continuous},
        )
        for fault in ("crash", "shape", "nan"):
            gym.register(
                f"Test{fault.title()}{c}-v0", entry_point=FaultyEnv, kwargs={"fault": fault, "continuous": continuous}
            )
    gym.register(
        "TestTruncate-v0", entry_point=ConstantEnv, kwargs={"length": 10, "terminate": False}, max_episode_steps=10
    )
    gym.register("TestImage-v0", entry_point=ConstantEnv, kwargs={"obs_shape": (8, 8, 3)})
    gym.register("TestCue-v0", entry_point=CueEnv)
    gym.register("TestCueContinuous-v0", entry_point=CueEnv, kwargs={"continuous": True})
    gym.register("TestUnbounded-v0", entry_point=UnboundedEnv)
    # Breakout cut by a time limit of 100 emulator frames (about 17 agent steps after the no-ops and FIRE).
    gym.register(
        "TestBreakoutCut-v0",
        entry_point="ale_py.env:AtariEnv",
        max_episode_steps=100,
        kwargs=dict(game="breakout", obs_type="rgb", frameskip=1, repeat_action_probability=0.0),
    )
    for name, kwargs in {
        "TestMasked-v0": {},
        "TestMaskedDict-v0": {"dict_obs": True},
        "TestMaskedMulti-v0": {"nvec": (3, 5, 2)},
        "TestEmptyMask-v0": {"empty_mask": True},
        "TestGameOver-v0": {"empty_final": True},
        "TestStart-v0": {"start": -2, "nvec": (3,)},
        "TestStartMulti-v0": {"start": 1, "nvec": (3, 2)},
        "TestLateMasks-v0": {"masks_at_reset": False, "strict": False},
    }.items():
        gym.register(name, entry_point=StrictMaskEnv, kwargs=kwargs)


def spaces(obs_space: gym.Space, action_space: gym.Space, mask_size: int = 0) -> SimpleNamespace:
    """What Agent(envs) reads of a vector env: the spaces of one of its envs (and, in ppo_discrete.py, the size of
    the action mask appended to the observations)."""
    return SimpleNamespace(single_observation_space=obs_space, single_action_space=action_space, mask_size=mask_size)


def box(*shape: int) -> gym.spaces.Box:
    return gym.spaces.Box(-np.inf, np.inf, shape, np.float32)


# ----------------------------------------------------------------------------------------------------
# The smallest run of each script, and running a script as a user would
# ----------------------------------------------------------------------------------------------------
TINY = {  # a few seconds each
    "ppo_discrete": dict(env_id="CartPole-v1", total_timesteps=512, num_envs=2, num_steps=64, num_minibatches=2),
    "ppo_continuous": dict(
        env_id="InvertedPendulum-v5", total_timesteps=512, num_envs=1, num_steps=128, num_minibatches=2
    ),
    "ppo_atari": dict(
        env_id="BreakoutNoFrameskip-v4", total_timesteps=128, num_envs=2, num_steps=32, num_minibatches=2, cuda=False
    ),
}


def tiny(ppo, sizes: dict = None, **kw):
    """Args of the smallest run of the script's env family, one epoch per update, no progress display; `sizes` (a
    test file's own run sizes) and then `kw` override them."""
    base = {**TINY[ppo.__name__], "update_epochs": 1, "progress": False, "run_name": "tiny"}
    return ppo.Args(**{**base, **(sizes or {}), **kw})


def tiny_argv(ppo, **kw) -> list[str]:
    """The same run as command-line options."""
    argv = []
    for name, value in {**TINY[ppo.__name__], "update_epochs": 1, "run_name": "tiny", **kw}.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag if value else flag.replace("--", "--no-", 1)] if isinstance(value, bool) else [flag, str(value)]
    return argv + ([] if "progress" in kw else ["--no-progress"])


def run_script(script: str, *args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """Run `python <script> args...` in the current folder, as a user would."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True, timeout=timeout, **popen
    )


def start_script(script: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def same_params(a: dict, b: dict) -> bool:
    """Two state dicts hold bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_bad_input(main, argv: list, expected: str, capsys) -> None:
    """main(argv) refuses before training: exit status 2 and one line on stderr that names the problem."""
    capsys.readouterr()  # what came before
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err, err


def logged(run_dir: str, tag: str = "losses/value_loss", steps: bool = False) -> list:
    """The values (or the steps) of a TensorBoard scalar a run wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.step if steps else e.value for e in events.Scalars(tag)]


def load(path) -> dict:
    """A checkpoint or saved agent, read as the scripts read it: without running any code stored in it."""
    return torch.load(path, map_location="cpu", weights_only=True)
