"""ppo_discrete.py's envs: CartPole's own vector env, the one place for a wrapper, invalid-action masks, actions
that start elsewhere than 0, several action dimensions, and the observations gymnasium flattens."""

import gymnasium as gym
import numpy as np
import pytest

import ppo_discrete as ppo
from helpers import assert_bad_input, same_params, tiny

RUN = dict(total_timesteps=1024, update_epochs=2)  # 8 updates of 2 envs x 64 steps


def test_cartpole_as_it_comes_steps_in_its_numpy_native_vector_env():
    envs = ppo.make_envs(ppo.Args(), 4)
    assert type(envs.unwrapped).__name__ == "CartPoleVectorEnv"  # several times faster than 4 envs one by one
    envs.close()


class CountedEnv(gym.Env):
    """Counts its copies that are open in this process."""

    open = 0
    observation_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self):
        CountedEnv.open += 1
        self.closed = False

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(4, np.float32), {}

    def step(self, action):
        return np.zeros(4, np.float32), 1.0, False, False, {}

    def close(self):
        CountedEnv.open -= not self.closed
        self.closed = True


gym.register("TestCounted-v0", entry_point=CountedEnv)
# The same env offered with a native vector env, as CartPole is: make_envs compares it with gym.make's first.
gym.register(
    "TestCountedNative-v0", entry_point=CountedEnv, vector_entry_point=gym.spec("CartPole-v1").vector_entry_point
)


@pytest.mark.parametrize(
    "env_id, kw", [("TestCounted-v0", {}), ("TestCounted-v0", {"async_envs": True}), ("TestCountedNative-v0", {})]
)
def test_make_envs_leaves_no_env_open_but_its_own(env_id, kw):
    CountedEnv.open = 0
    envs = ppo.make_envs(ppo.Args(env_id=env_id, **kw), 2)
    envs.close()
    assert CountedEnv.open == 0


def test_a_wrapper_added_in_make_env_applies_to_every_training_env(monkeypatch):
    # CartPole's native vector env bypasses make_env: it must step aside once make_env adds a wrapper.
    steps = []

    class Counting(gym.Wrapper):
        def step(self, action):
            steps.append(action)
            return self.env.step(action)

    make_env = ppo.make_env
    monkeypatch.setattr(ppo, "make_env", lambda *a, **kw: lambda: Counting(make_env(*a, **kw)()))
    result = ppo.train(tiny(ppo, RUN))
    # Every step of the run went through the wrapper, but the steps that only reset an ended episode.
    assert result["global_step"] - len(result["episodes"]["returns"]) <= len(steps) <= result["global_step"]


def test_arguments_added_to_gym_make_in_make_env_apply_to_every_training_env(monkeypatch):
    # The same wrappers as gym.make(env_id) gives, but another time limit: the native vector env, which would keep
    # CartPole's 500 steps, must step aside as well.
    monkeypatch.setattr(
        ppo, "make_env", lambda env_id, idx, video_dir=None: lambda: gym.make(env_id, max_episode_steps=5)
    )
    result = ppo.train(tiny(ppo, RUN))
    assert result["episodes"]["lengths"] and max(result["episodes"]["lengths"]) <= 5


# ----------------------------------------------------------------------------------------------------
# Masks, action spaces that start elsewhere, several dimensions (StrictMaskEnv raises on any action it forbids:
# a run that finishes sent only valid actions)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "env_id, mask_size", [("TestMasked-v0", 5), ("TestMaskedDict-v0", 5), ("TestMaskedMulti-v0", 3 + 5 + 2)]
)
def test_masks_from_info_or_from_a_dict_observation_are_respected_in_training(env_id, mask_size):
    result = ppo.train(tiny(ppo, RUN, env_id=env_id))
    assert result["global_step"] == 1024 and result["agent"].mask_size == mask_size


def test_a_mask_that_allows_no_action_is_a_clear_error(capsys):
    # ... but only where the episode goes on.
    assert_bad_input(
        ppo.main,
        ["--env-id", "TestEmptyMask-v0"],
        "gave an action mask that allows no action (env 0, action dimension 0)",
        capsys,
    )


def test_a_final_observation_may_allow_no_action(in_tmp_dir):
    # A game over that leaves no legal move: the step from the final observation only resets the env, and the action
    # chosen there is never sent to it nor learned from. Training and evaluation go on.
    result = ppo.train(tiny(ppo, RUN, env_id="TestGameOver-v0", save_model=True))
    assert result["global_step"] == 1024 and len(result["episodes"]["returns"]) >= 50
    returns, _ = ppo.evaluate("runs/tiny/agent.pt", episodes=3)
    assert len(returns) == 3


@pytest.mark.parametrize("env_id", ["TestStart-v0", "TestStartMulti-v0"])
def test_actions_that_start_elsewhere_than_0_are_shifted_for_the_env(env_id, in_tmp_dir):
    # Discrete(3, start=-2) takes -2, -1, 0: the agent picks 0, 1, 2, and the env gets them shifted.
    result = ppo.train(tiny(ppo, RUN, env_id=env_id, save_model=True))
    assert result["global_step"] == 1024
    assert result["agent"].nvec == ([3] if env_id == "TestStart-v0" else [3, 2])
    assert len(ppo.evaluate("runs/tiny/agent.pt", episodes=2)[0]) == 2


def test_masks_given_only_after_a_step_are_named_in_a_warning(capsys):
    result = ppo.train(tiny(ppo, RUN, env_id="TestLateMasks-v0", total_timesteps=128, num_steps=32))
    assert result["agent"].mask_size == 0
    assert "gives info['action_mask'] after a step but not at reset" in capsys.readouterr().err


def test_no_action_masks_trains_without_them(monkeypatch):
    seen, original = [], ppo.Agent.__init__

    def record(self, envs, *a):
        original(self, envs, *a)
        seen.append((self.mask_size, envs.single_observation_space.shape))

    monkeypatch.setattr(ppo.Agent, "__init__", record)
    ppo.train(tiny(ppo, RUN, env_id="Taxi-v4", action_masks=False, total_timesteps=256))
    ppo.train(tiny(ppo, RUN, env_id="Taxi-v4", run_name="masked", total_timesteps=256))
    assert seen == [(0, (500,)), (6, (506,))]  # Taxi's 500 states one-hot, then its 6 actions' mask


def test_a_masked_run_resumes_exactly_and_its_saved_agent_evaluates(in_tmp_dir):
    straight = ppo.train(tiny(ppo, RUN, env_id="TestMaskedMulti-v0", run_name="straight", save_model=True))
    ppo.train(tiny(ppo, RUN, env_id="TestMaskedMulti-v0", run_name="cut", checkpoint_every=1), stop_at_step=512)
    resumed = ppo.train(tiny(ppo, RUN, env_id="TestMaskedMulti-v0", run_name="cut", resume="runs/cut/checkpoint.pt"))
    assert same_params(straight["agent"].state_dict(), resumed["agent"].state_dict())
    returns, _ = ppo.evaluate("runs/straight/agent.pt", episodes=3, deterministic=True)
    assert returns.shape == (3,)


# ----------------------------------------------------------------------------------------------------
# Observations gymnasium flattens, and what this script refuses
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id, size", [("Taxi-v4", 500 + 6), ("FrozenLake-v1", 16), ("Blackjack-v1", 32 + 11 + 2)])
def test_toy_text_envs_train_as_they_are(env_id, size, in_tmp_dir):
    assert (
        ppo.main(
            [
                "--env-id",
                env_id,
                "--total-timesteps",
                "512",
                "--num-steps",
                "64",
                "--no-progress",
                "--run-name",
                "toy",
                "--save-model",
            ]
        )
        == 0
    )
    assert ppo.make_envs(ppo.Args(env_id=env_id), 1).single_observation_space.shape == (size,)
    assert ppo.main(["--eval-checkpoint", "runs/toy/agent.pt", "--eval-episodes", "2"]) == 0


def test_a_two_dimensional_action_space_is_refused(capsys):
    class Grid(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        action_space = gym.spaces.MultiDiscrete([[2, 2], [2, 2]])

        def reset(self, *, seed=None, options=None):
            return np.zeros(2, np.float32), {}

    if "TestGridActions-v0" not in gym.registry:
        gym.register("TestGridActions-v0", entry_point=Grid)
    assert_bad_input(ppo.main, ["--env-id", "TestGridActions-v0"], "one-dimensional MultiDiscrete", capsys)
