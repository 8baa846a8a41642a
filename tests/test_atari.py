"""ppo_atari.py's envs, on real ROMs: the preprocessing, FIRE, lost lives, the real score, the emulator in
checkpoints."""

import os
import re

import cv2
import gymnasium as gym
import numpy as np
import pytest
import torch

import ppo_atari as ppo
from helpers import assert_bad_input, tiny


def test_frames_are_84x84_gray_uint8_stacked_oldest_first():
    envs = ppo.make_envs(ppo.Args(), 1)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (1, 4, 84, 84) and obs.dtype == np.uint8
    assert all(np.array_equal(obs[0, i], obs[0, 3]) for i in range(3))  # at reset: the first frame, four times
    for action in [2, 3, 2, 2, 3]:
        new, *_ = envs.step(np.array([action]))
        # The stack shifts by one: the newest frame is last, the others are the previous stack's last three.
        np.testing.assert_array_equal(new[0, :3], obs[0, 1:])
        obs = new
    assert obs[0, -1].max() > 0
    envs.close()


@pytest.mark.parametrize("backend", ["gymnasium", "ale-vector"])
def test_lstm_sees_one_frame_unless_frame_stack_is_given(backend):
    # The reference's recurrent Atari setup: one frame, the LSTM remembering those before; 4 frames without --lstm.
    for options, frames in (
        ({}, 4),
        ({"lstm": True}, 1),
        ({"lstm": True, "frame_stack": 4}, 4),
        ({"frame_stack": 2}, 2),
    ):
        envs = ppo.make_envs(ppo.Args(env_backend=backend, async_envs=False, **options), 1)
        assert envs.single_observation_space.shape == (frames, 84, 84), options
        assert envs.reset(seed=0)[0].shape == (1, frames, 84, 84), options
        envs.close()


def test_fire_on_reset_only_for_games_that_need_it():
    breakout = ppo.make_env("BreakoutNoFrameskip-v4", 0, None)()
    pacman = ppo.make_env("MsPacmanNoFrameskip-v4", 0, None)()  # no FIRE action at all
    assert breakout.get_wrapper_attr("needs_fire") and not pacman.get_wrapper_attr("needs_fire")
    breakout.reset(seed=0)
    # FIRE was pressed: frames were played after the no-ops, and the ball is in play.
    assert breakout.unwrapped.ale.getEpisodeFrameNumber() > 0


def test_sticky_actions_setting():
    def sticky(env_id, value=None):
        return ppo.make_env(env_id, 0, None, value)().unwrapped.ale.getFloat("repeat_action_probability")

    assert sticky("BreakoutNoFrameskip-v4") == 0.0
    assert sticky("ALE/Breakout-v5") == pytest.approx(0.25)
    assert sticky("ALE/Breakout-v5", 0.0) == 0.0


@pytest.mark.parametrize("backend", ["gymnasium", "ale-vector"])
def test_reported_return_is_the_unclipped_score_over_all_lives(backend):
    envs = ppo.make_envs(ppo.Args(env_id="SpaceInvadersNoFrameskip-v4", env_backend=backend), 1)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    clipped_sum, lives_seen, learned = 0.0, set(), set()
    for _ in range(5000):
        _, reward, terminated, truncated, info = envs.step(rng.integers(0, 6, size=1))
        clipped_sum += reward[0]
        learned.add(float(reward[0]))
        lives_seen.add(int(info["lives"][0]))
        if terminated[0] or truncated[0]:
            break
    score = info["episode"]["r"][0]
    assert learned == {0.0, 1.0}  # every reward learning sees is a sign, though invaders are worth 5 to 30
    assert score > clipped_sum > 0  # invaders are worth 5 to 30 points; learning sees +1 for each
    assert score % 5 == 0
    assert {3, 2, 1} <= lives_seen  # one episode spans every life


@pytest.mark.parametrize("backend", ["gymnasium", "ale-vector"])
def test_a_lost_life_ends_the_episode_for_learning_only(backend, monkeypatch):
    seen = []
    original = ppo.compute_gae

    def spy(rewards, values, terminations, dones, gamma, gae_lambda):
        seen.append((terminations.clone(), dones.clone()))
        return original(rewards, values, terminations, dones, gamma, gae_lambda)

    monkeypatch.setattr(ppo, "compute_gae", spy)
    result = ppo.train(tiny(ppo, total_timesteps=1024, num_envs=1, num_steps=512, env_backend=backend))
    terminations, dones = torch.cat([t for t, _ in seen]), torch.cat([d for _, d in seen])
    # A random Breakout agent loses lives within 1000 steps; a whole game (5 lives) takes longer.
    assert terminations.sum() >= 1
    assert len(result["episodes"]["returns"]) < terminations.sum()
    # A lost life is a terminal state for GAE too: no advantage flows back across it.
    assert (dones >= terminations).all()


def test_bfloat16_autocast_trains():
    result = ppo.train(tiny(ppo, total_timesteps=256, bf16=True, run_name="bf16"))
    assert result["global_step"] == 256
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in result["agent"].parameters())


def test_up_to_30_noops_at_reset():
    # Ms. Pac-Man has no FIRE action, so the frames played at reset are the no-ops alone, one frame each
    # (the emulator itself does not skip frames).
    env = ppo.make_env("MsPacmanNoFrameskip-v4", 0, None)()
    assert env.get_wrapper_attr("noop_max") == 30
    frames = set()
    for seed in range(10):
        env.reset(seed=seed)
        frames.add(env.unwrapped.ale.getEpisodeFrameNumber())
    assert all(1 <= f <= 30 for f in frames) and len(frames) >= 5  # a random number of no-ops per episode


def test_one_step_plays_4_frames_and_sees_the_max_of_the_last_two():
    env = ppo.make_env("BreakoutNoFrameskip-v4", 0, None)()
    assert env.get_wrapper_attr("frame_skip") == 4
    ale = env.unwrapped.ale
    env.reset(seed=0)
    for _ in range(12):  # until the ball is in flight, so consecutive frames differ
        env.step(0)
    before, frame = ale.cloneState(), ale.getEpisodeFrameNumber()
    obs, *_ = env.step(3)
    assert ale.getEpisodeFrameNumber() == frame + 4

    # The same 4 frames again by hand, one emulator frame at a time.
    ale.restoreState(before)
    screens = []
    for _ in range(4):
        env.unwrapped.step(3)
        screens.append(ale.getScreenGrayscale())
    shrink = lambda img: cv2.resize(img, (84, 84), interpolation=cv2.INTER_AREA)  # noqa: E731
    np.testing.assert_array_equal(obs[-1], shrink(np.maximum(screens[2], screens[3])))
    assert not np.array_equal(obs[-1], shrink(screens[3]))  # the max matters here: the ball moved


def test_fire_is_pressed_after_a_lost_life(monkeypatch):
    actions = []
    step = gym.wrappers.AtariPreprocessing.step

    def recorded(self, action):  # every action FireOnReset sends down to the preprocessing under it
        actions.append(int(action))
        return step(self, action)

    monkeypatch.setattr(gym.wrappers.AtariPreprocessing, "step", recorded)
    env = ppo.make_env("BreakoutNoFrameskip-v4", 0, None)()
    env.reset(seed=0)
    assert actions == [1]
    lives = env.unwrapped.ale.lives()
    for _ in range(1000):  # the paddle stands still, so the ball is soon missed
        actions.clear()
        _, _, terminated, truncated, info = env.step(0)
        if info["lives"] < lives:
            break
        assert actions == [0]
    assert info["lives"] == lives - 1 and not (terminated or truncated)
    assert actions == [0, 1]  # the NOOP that lost the life, then FIRE to serve the next ball


# ----------------------------------------------------------------------------------------------------
# --env-backend ale-vector: ale-py's threaded vector env
# ----------------------------------------------------------------------------------------------------
def test_the_ale_vector_backend_sees_what_the_reference_preprocessing_sees():
    made = {
        backend: ppo.make_envs(ppo.Args(env_backend=backend, async_envs=False), 2)
        for backend in ("gymnasium", "ale-vector")
    }
    assert isinstance(made["ale-vector"].unwrapped, ppo.AleVectorEnv)
    frames = {}
    for backend, envs in made.items():
        assert envs.single_observation_space == gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
        assert type(envs) is type(made["gymnasium"])  # the same reward clipping over the same episode statistics
        obs, info = envs.reset(seed=1)
        frames[backend] = [obs]
        for _ in range(40):  # FIRE at reset, then no-ops: the ball is lost, and a life with it
            obs, reward, _, _, info = envs.step(np.zeros(2, int))
            frames[backend].append(obs)
        assert list(envs.unwrapped.call("lives")) == list(info["lives"]) == [4, 4]
        envs.close()
    newest = {backend: np.stack(f)[:, :, -1].astype(int) for backend, f in frames.items()}
    # The same 84x84 gray frames but for a few pixels (ALE's own grayscale and resize): 0.1% of them here.
    assert (newest["gymnasium"] != newest["ale-vector"]).mean() < 0.01
    # At reset the stack is padded with zeros, where gymnasium's repeats the first frame.
    assert frames["ale-vector"][0][:, 0].max() == 0 and frames["gymnasium"][0][:, 0].max() > 0


def test_a_run_with_ale_vector_resumes_with_new_episodes_and_says_so(in_tmp_dir, capsys):
    ppo.train(tiny(ppo, total_timesteps=256, env_backend="ale-vector", checkpoint_every=1), stop_at_step=128)
    assert "checkpoints hold no envs (its envs cannot be saved: " in capsys.readouterr().err
    resumed = ppo.train(tiny(ppo, total_timesteps=256, env_backend="ale-vector", resume="runs/tiny/checkpoint.pt"))
    assert resumed["global_step"] == 256
    assert "runs/tiny/checkpoint.pt holds no envs (its envs cannot be saved: " in capsys.readouterr().err


def test_env_backend_is_one_of_its_choices_and_help_lists_them(capsys):
    with pytest.raises(SystemExit) as refused:
        ppo.main(["--env-backend", "nonsense"])
    err = " ".join(re.sub("[│╭╮╰╯─]", " ", capsys.readouterr().err).split())  # tyro's boxes wrap the lines
    assert refused.value.code == 2 and "'nonsense'" in err and "('gymnasium', 'ale-vector')" in err, err
    with pytest.raises(SystemExit) as helped:
        ppo.main(["--help"])
    out = " ".join(re.sub("[│╭╮╰╯─]", " ", capsys.readouterr().out).split())
    assert helped.value.code == 0 and "--env-backend {gymnasium,ale-vector}" in out


def test_ale_vector_refuses_video_in_one_line(in_tmp_dir, capsys):
    argv = [
        "--env-backend",
        "ale-vector",
        "--capture-video",
        "--total-timesteps",
        "256",
        "--num-envs",
        "2",
        "--num-steps",
        "32",
        "--no-cuda",
    ]
    assert_bad_input(
        ppo.main, argv, "--capture-video records through gymnasium's wrappers; leave --env-backend at gymnasium", capsys
    )
    assert not os.listdir("runs")  # nothing started, nothing left behind
