"""ppo_discrete.py on the environments researchers bring: invalid-action masks, MultiDiscrete and MultiBinary
actions, observations that gymnasium flattens (Taxi, FrozenLake, Blackjack)."""

import os

import gymnasium as gym
import numpy as np
import pytest
import torch

import ppo_discrete as ppo
from helpers import assert_bad_input, box, same_params, spaces

N_OBS = 3


class StrictMaskEnv(gym.Env):
    """Random action masks, and an error on any action the mask forbids: a run that trains on it without an
    error sampled only valid actions. Reward 1 for the lowest valid option of every dimension."""

    def __init__(self, nvec=(5,), dict_obs=False, empty_mask=False, episode=10):
        self.nvec, self.dict_obs, self.empty_mask, self.episode = list(nvec), dict_obs, empty_mask, episode
        self.action_space = gym.spaces.Discrete(nvec[0]) if len(nvec) == 1 else gym.spaces.MultiDiscrete(nvec)
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
        if self.empty_mask:
            self.mask[:] = 0
        vector = np.concatenate([[self.t / self.episode], self.mask[:N_OBS - 1]]).astype(np.float32)
        return ({"obs": vector, "action_mask": self.mask} if self.dict_obs else vector), {"action_mask": self.mask}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        obs, info = self.new_mask()
        return obs, ({} if self.dict_obs else info)

    def step(self, action):
        action = np.atleast_1d(action)
        start, reward = 0, 0.0
        for a, n in zip(action, self.nvec):
            group = self.mask[start:start + n]
            assert group[a], f"invalid action {a} of {n} under mask {group}"
            reward += float(a == np.flatnonzero(group)[0])
            start += n
        self.t += 1
        obs, info = self.new_mask()
        return obs, reward, self.t >= self.episode, False, ({} if self.dict_obs else info)


for name, kwargs in {"TestMasked-v0": {}, "TestMaskedDict-v0": {"dict_obs": True},
                     "TestMaskedMulti-v0": {"nvec": (3, 5, 2)}, "TestEmptyMask-v0": {"empty_mask": True}}.items():
    if name not in gym.registry:
        gym.register(name, entry_point=StrictMaskEnv, kwargs=kwargs)


def tiny(**kw) -> ppo.Args:
    base = dict(total_timesteps=1024, num_envs=2, num_steps=64, num_minibatches=2, update_epochs=2, progress=False,
                run_name="tiny")
    return ppo.Args(**{**base, **kw})


def masked_agent(nvec, seed=0) -> ppo.Agent:
    """An agent whose policy is far from uniform, so that sampling and log-probs are tested where they differ."""
    torch.manual_seed(seed)
    act = gym.spaces.Discrete(nvec[0]) if len(nvec) == 1 else gym.spaces.MultiDiscrete(nvec)
    agent = ppo.Agent(spaces(box(N_OBS + sum(nvec)), act, mask_size=sum(nvec)))
    with torch.no_grad():
        agent.actor[-1].weight.normal_(0, 3.0)
    return agent


def random_masks(rows: int, nvec, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    groups = []
    for n in nvec:
        group = rng.random((rows, n)) < 0.4
        group[np.arange(rows), rng.integers(n, size=rows)] = True
        groups.append(group)
    return torch.as_tensor(np.concatenate(groups, axis=1), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# Masks: sampling, log-probs, entropy, ratio
# ----------------------------------------------------------------------------------------------------
def test_masked_sampling_never_returns_an_invalid_action():
    agent, rows = masked_agent([5]), 8
    masks = random_masks(rows, [5])
    obs = torch.cat([torch.randn(rows, N_OBS), masks], 1).repeat(5000, 1)
    with torch.no_grad():
        actions = agent.act(obs)
    assert masks.repeat(5000, 1)[torch.arange(len(actions)), actions].all()
    # Without the mask the same policy picks an invalid action often: the test can tell the two apart.
    unmasked = ppo.Agent(spaces(box(N_OBS), gym.spaces.Discrete(5)))
    unmasked.actor.load_state_dict(agent.actor.state_dict())
    with torch.no_grad():
        free = unmasked.act(obs[:, :N_OBS])
    assert (1 - masks.repeat(5000, 1)[torch.arange(len(free)), free]).mean() > 0.1


def test_masked_log_probs_and_entropy_match_a_categorical_over_the_valid_actions():
    agent, rows = masked_agent([5]), 16
    masks = random_masks(rows, [5], seed=1)
    obs = torch.cat([torch.randn(rows, N_OBS), masks], 1)
    with torch.no_grad():
        logits = agent.actor(obs[:, :N_OBS])
        for row in range(rows):
            valid = masks[row].bool()
            dist = torch.distributions.Categorical(logits=logits[row][valid])
            for k, action in enumerate(valid.nonzero().flatten()):
                _, logp, entropy, _ = agent.get_action_and_value(obs[row:row + 1], action.view(1))
                torch.testing.assert_close(logp, dist.log_prob(torch.tensor([k])), rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(entropy, dist.entropy().view(1), rtol=1e-5, atol=1e-6)


def test_the_ratio_of_a_masked_action_is_finite_and_sends_no_nan_gradient():
    old, new = masked_agent([5], seed=0), masked_agent([5], seed=1)
    masks = random_masks(4, [5], seed=2)
    obs = torch.cat([torch.randn(4, N_OBS), masks], 1)
    invalid = (1 - masks).argmax(1)  # an action the mask forbids, in rows that forbid any
    rows = (1 - masks).sum(1) > 0
    with torch.no_grad():
        _, oldlogp, _, _ = old.get_action_and_value(obs, invalid)
    _, newlogp, entropy, _ = new.get_action_and_value(obs, invalid)
    ratio = (newlogp - oldlogp).exp()
    assert rows.any() and torch.isfinite(ratio).all() and torch.isfinite(entropy).all()
    (ratio.sum() + entropy.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in new.parameters() if p.grad is not None)


def test_a_mask_that_allows_no_action_is_a_clear_error(capsys):
    assert_bad_input(ppo.main, ["--env-id", "TestEmptyMask-v0"],
                     "gave an action mask that allows no action (env 0, action dimension 0)", capsys)


# ----------------------------------------------------------------------------------------------------
# MultiDiscrete and MultiBinary actions
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", [gym.spaces.MultiDiscrete([3, 5, 2]), gym.spaces.MultiBinary(4)],
                         ids=["MultiDiscrete", "MultiBinary"])
def test_multi_dimensional_log_prob_and_entropy_are_sums_over_independent_categoricals(space):
    torch.manual_seed(0)
    agent = ppo.Agent(spaces(box(N_OBS), space))
    with torch.no_grad():
        agent.actor[-1].weight.normal_(0, 3.0)
        obs = torch.randn(64, N_OBS)
        action, logp, entropy, _ = agent.get_action_and_value(obs)
        nvec = ppo.choices(space)
        assert action.shape == (64, len(nvec))
        dists = [torch.distributions.Categorical(logits=x) for x in agent.actor(obs).split(nvec, -1)]
        expected_logp = sum(d.log_prob(action[:, i]) for i, d in enumerate(dists))
        expected_entropy = sum(d.entropy() for d in dists)
        torch.testing.assert_close(logp, expected_logp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)
        # Each dimension is sampled from its own distribution: compare the frequencies on one observation.
        many = agent.act(obs[:1].expand(20000, N_OBS))
        for i, d in enumerate(dists):
            freq = torch.bincount(many[:, i], minlength=nvec[i]).float() / len(many)
            bound = 4 * (d.probs[0] * (1 - d.probs[0]) / len(many)).sqrt() + 1e-3  # 4 standard errors
            assert ((freq - d.probs[0]).abs() <= bound).all(), (freq, d.probs[0])


def test_multidiscrete_masks_apply_per_dimension_in_training():
    # StrictMaskEnv raises on a forbidden action: the run finishing means every action was valid.
    result = ppo.train(tiny(env_id="TestMaskedMulti-v0"))
    assert result["global_step"] == 1024
    assert result["agent"].mask_size == 3 + 5 + 2


# ----------------------------------------------------------------------------------------------------
# Masks in training, and switched off
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ["TestMasked-v0", "TestMaskedDict-v0"])
def test_masks_from_info_or_from_a_dict_observation_are_respected_in_training(env_id):
    result = ppo.train(tiny(env_id=env_id))
    assert result["global_step"] == 1024 and result["agent"].mask_size == 5


def test_no_action_masks_trains_without_them(monkeypatch):
    seen = []
    original = ppo.Agent.__init__

    def record(self, envs):
        original(self, envs)
        seen.append((self.mask_size, envs.single_observation_space.shape))

    monkeypatch.setattr(ppo.Agent, "__init__", record)
    ppo.train(tiny(env_id="Taxi-v4", action_masks=False, total_timesteps=256))
    ppo.train(tiny(env_id="Taxi-v4", run_name="masked", total_timesteps=256))
    assert seen == [(0, (500,)), (6, (506,))]  # Taxi's 500 states one-hot, then its 6 actions' mask


# ----------------------------------------------------------------------------------------------------
# Observations gymnasium flattens
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id, size", [("Taxi-v4", 500 + 6), ("FrozenLake-v1", 16), ("Blackjack-v1", 32 + 11 + 2)])
def test_toy_text_envs_train_as_they_are(env_id, size, in_tmp_dir):
    assert ppo.main(["--env-id", env_id, "--total-timesteps", "1024", "--num-steps", "128", "--no-progress",
                     "--run-name", "toy", "--save-model"]) == 0
    envs = ppo.make_envs(ppo.Args(env_id=env_id), 1)
    assert envs.single_observation_space.shape == (size,)
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


# ----------------------------------------------------------------------------------------------------
# Saving, evaluation and resume carry the masks along
# ----------------------------------------------------------------------------------------------------
def test_a_masked_run_resumes_exactly_and_its_saved_agent_evaluates(in_tmp_dir):
    straight = ppo.train(tiny(env_id="TestMaskedMulti-v0", run_name="straight", save_model=True))
    ppo.train(tiny(env_id="TestMaskedMulti-v0", run_name="cut", checkpoint_every=1), stop_at_step=512)
    resumed = ppo.train(tiny(env_id="TestMaskedMulti-v0", resume="runs/cut/checkpoint.pt"))
    assert same_params(straight["agent"].state_dict(), resumed["agent"].state_dict())
    returns = ppo.evaluate("runs/straight/agent.pt", episodes=3, deterministic=True)
    assert returns.shape == (3,)
    assert os.path.exists("runs/straight/agent.pt")
