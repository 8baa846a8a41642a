"""ppo_atari.py: the preprocessing on real ROMs, the CNN, life loss, end to end, resume, bad input."""

import cv2
import gymnasium as gym
import numpy as np
import pytest
import torch

import ppo_atari as ppo
from helpers import assert_bad_input, run_script, same_params, spaces

SCRIPT = "ppo_atari.py"
FRAMES = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)


def tiny(**kw) -> ppo.Args:
    base = dict(total_timesteps=256, num_envs=2, num_steps=32, num_minibatches=2, update_epochs=1, progress=False,
                run_name="tiny", cuda=False)
    return ppo.Args(**{**base, **kw})


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


def test_fire_on_reset_only_for_games_that_need_it():
    breakout = ppo.make_env("BreakoutNoFrameskip-v4", 0, None)()
    pacman = ppo.make_env("MsPacmanNoFrameskip-v4", 0, None)()  # no FIRE action at all
    fire = lambda env: [w for w in iter_wrappers(env) if isinstance(w, ppo.FireOnReset)][0]  # noqa: E731
    assert fire(breakout).needs_fire and not fire(pacman).needs_fire
    breakout.reset(seed=0)
    # FIRE was pressed: frames were played after the no-ops, and the ball is in play.
    assert breakout.unwrapped.ale.getEpisodeFrameNumber() > 0


def iter_wrappers(env):
    while True:
        yield env
        if not hasattr(env, "env"):
            return
        env = env.env


def test_sticky_actions_setting():
    def sticky(env_id, value=None):
        return ppo.make_env(env_id, 0, None, value)().unwrapped.ale.getFloat("repeat_action_probability")

    assert sticky("BreakoutNoFrameskip-v4") == 0.0
    assert sticky("ALE/Breakout-v5") == pytest.approx(0.25)
    assert sticky("ALE/Breakout-v5", 0.0) == 0.0


def test_reported_return_is_the_unclipped_score_over_all_lives():
    envs = ppo.make_envs(ppo.Args(env_id="SpaceInvadersNoFrameskip-v4"), 1)
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


def test_a_lost_life_ends_the_episode_for_learning_only(monkeypatch):
    seen = []
    original = ppo.compute_gae

    def spy(rewards, values, terminations, dones, gamma, gae_lambda):
        seen.append((terminations.clone(), dones.clone()))
        return original(rewards, values, terminations, dones, gamma, gae_lambda)

    monkeypatch.setattr(ppo, "compute_gae", spy)
    result = ppo.train(tiny(total_timesteps=1024, num_envs=1, num_steps=512))
    terminations, dones = torch.cat([t for t, _ in seen]), torch.cat([d for _, d in seen])
    # A random Breakout agent loses lives within 1000 steps; a whole game (5 lives) takes longer.
    assert terminations.sum() >= 1
    assert len(result["episodes"]["returns"]) < terminations.sum()
    # A lost life is a terminal state for GAE too: no advantage flows back across it.
    assert (dones >= terminations).all()


def test_cnn_shapes():
    agent = ppo.Agent(spaces(FRAMES, gym.spaces.Discrete(6)))
    obs = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    assert agent.network(obs.float()).shape == (3, 512)
    assert agent.get_value(obs).shape == (3,)
    assert agent.act(obs).shape == (3,) and agent.act(obs).max() < 6
    _, logp, entropy, value = agent.get_action_and_value(obs, torch.tensor([0, 1, 5]))
    assert logp.shape == entropy.shape == value.shape == (3,)
    assert torch.allclose(entropy, torch.full((3,), np.log(6)), atol=1e-3)  # 0.01 head gain: near uniform


def test_end_to_end_save_evaluate_and_cuda_fallback(in_tmp_dir):
    out = run_script(SCRIPT, "--total-timesteps", "128", "--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2",
                     "--run-name", "cli", "--save-model", "--cuda")
    assert out.returncode == 0, out.stderr
    if not torch.cuda.is_available():
        assert "no CUDA GPU is available; running on the CPU" in out.stderr
    path = in_tmp_dir / "runs" / "cli" / "agent.pt"
    returns = ppo.evaluate(str(path), episodes=1)
    assert returns.shape == (1,)


def test_resume_is_exact(in_tmp_dir):
    straight = ppo.train(tiny(run_name="straight"))
    ppo.train(tiny(run_name="cut", checkpoint_every=1), stop_at_step=128)
    resumed = ppo.train(tiny(resume=str(in_tmp_dir / "runs" / "cut" / "checkpoint.pt")))
    assert resumed["global_step"] == 256
    assert same_params(straight["agent"].state_dict(), resumed["agent"].state_dict())


BAD = [
    (["--env-id", "CartPole-v1"], "ppo_discrete.py"),
    (["--env-id", "HalfCheetah-v5"], "ppo_continuous.py"),
    (["--env-id", "BreakoutNoFrameskip-v5"], "BreakoutNoFrameskip-v4"),
    (["--sticky-actions", "1.5"], "--sticky-actions is 1.5"),
    (["--num-minibatches", "3"], "--num-minibatches 3"),
]


@pytest.mark.parametrize("argv,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_clear_line(argv, expected, capsys):
    assert_bad_input(ppo.main, argv, expected, capsys)


def test_bfloat16_autocast_trains():
    result = ppo.train(tiny(bf16=True, run_name="bf16"))
    assert result["global_step"] == 256
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in result["agent"].parameters())


def test_bfloat16_runs_only_the_trunk_the_heads_and_sampling_stay_fp32():
    torch.manual_seed(0)
    agent = ppo.Agent(spaces(FRAMES, gym.spaces.Discrete(4)))
    obs = torch.randint(0, 256, (6, 4, 84, 84), dtype=torch.uint8)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        assert agent.network(obs.float()).dtype == torch.bfloat16
        logits, value = agent(obs)
        action, logp, _, value2 = agent.get_action_and_value(obs)
        _, newlogp, entropy, value3 = agent.get_action_and_value(obs, action)
    assert logits.dtype == value.dtype == logp.dtype == value2.dtype == newlogp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, newlogp)
    torch.testing.assert_close(value2, value3)


def find_wrapper(env, kind):
    return next(w for w in iter_wrappers(env) if isinstance(w, kind))


def test_up_to_30_noops_at_reset():
    # Ms. Pac-Man has no FIRE action, so the frames played at reset are the no-ops alone, one frame each
    # (the emulator itself does not skip frames).
    env = ppo.make_env("MsPacmanNoFrameskip-v4", 0, None)()
    assert find_wrapper(env, gym.wrappers.AtariPreprocessing).noop_max == 30
    frames = set()
    for seed in range(10):
        env.reset(seed=seed)
        frames.add(env.unwrapped.ale.getEpisodeFrameNumber())
    assert all(1 <= f <= 30 for f in frames) and len(frames) >= 5  # a random number of no-ops per episode


def test_one_step_plays_4_frames_and_sees_the_max_of_the_last_two():
    env = ppo.make_env("BreakoutNoFrameskip-v4", 0, None)()
    assert find_wrapper(env, gym.wrappers.AtariPreprocessing).frame_skip == 4
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


def test_frames_are_scaled_to_0_1_inside_the_network():
    torch.manual_seed(0)
    agent = ppo.Agent(spaces(FRAMES, gym.spaces.Discrete(4)))
    obs = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        hidden = agent.network(obs.float() / 255.0)
        torch.testing.assert_close(agent(obs)[1], agent.critic(hidden).squeeze(-1), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(agent(obs)[1], agent.critic(agent.network(obs.float())).squeeze(-1), rtol=1e-2)


def test_fire_is_pressed_after_a_lost_life():
    class Recorder(gym.Wrapper):
        def __init__(self, env):
            super().__init__(env)
            self.actions = []

        def step(self, action):
            self.actions.append(int(action))
            return self.env.step(action)

    env = ppo.make_env("BreakoutNoFrameskip-v4", 0, None)()
    fire = find_wrapper(env, ppo.FireOnReset)
    fire.env = recorder = Recorder(fire.env)  # sees every action FireOnReset sends down
    env.reset(seed=0)
    assert recorder.actions == [1]
    lives = env.unwrapped.ale.lives()
    for _ in range(1000):  # the paddle stands still, so the ball is soon missed
        recorder.actions.clear()
        _, _, terminated, truncated, info = env.step(0)
        if info["lives"] < lives:
            break
        assert recorder.actions == [0]
    assert info["lives"] == lives - 1 and not (terminated or truncated)
    assert recorder.actions == [0, 1]  # the NOOP that lost the life, then FIRE to serve the next ball


def test_same_seed_same_numbers():
    a = ppo.train(tiny(run_name="a"))
    b = ppo.train(tiny(run_name="b"))
    c = ppo.train(tiny(run_name="c", seed=2))
    assert same_params(a["agent"].state_dict(), b["agent"].state_dict())
    assert a["episodes"]["returns"] == b["episodes"]["returns"]
    assert not same_params(a["agent"].state_dict(), c["agent"].state_dict())


def test_capture_video(in_tmp_dir):
    import glob

    ppo.train(tiny(capture_video=True))
    assert glob.glob(str(in_tmp_dir / "videos" / "tiny" / "*.mp4"))


def test_track_with_wandb_offline(in_tmp_dir):
    import glob
    import os

    out = run_script(SCRIPT, "--total-timesteps", "128", "--num-envs", "2", "--num-steps", "32", "--num-minibatches",
                     "2", "--no-cuda", "--run-name", "tracked", "--track",
                     env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr
    assert glob.glob(str(in_tmp_dir / "wandb" / "offline-run-*"))


def test_nan_loss_stops_the_run(monkeypatch, capsys):
    make_envs = ppo.make_envs
    steps = []

    def nan_rewards_later(args, num_envs, video_dir=None):
        envs = make_envs(args, num_envs, video_dir)
        return gym.wrappers.vector.TransformReward(envs, lambda r: r * np.nan if steps.append(1) or len(steps) > 40 else r)

    monkeypatch.setattr(ppo, "make_envs", nan_rewards_later)
    code = ppo.main(["--total-timesteps", "256", "--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2",
                     "--no-cuda", "--run-name", "nan", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "loss became nan" in err and "(update 2)" in err
