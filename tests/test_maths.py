"""The maths of PPO, against brute-force references: GAE, the loss, the diagnostics, and each family's policy
(categorical with masks and several dimensions, diagonal Gaussian, the Atari CNN). The core is repeated in every
script by design; these tests run on every copy and check that the copies agree."""

import importlib
import inspect
import math
import os

import gymnasium as gym
import numpy as np
import pytest
import torch

from helpers import N_OBS, ROOT, SCRIPTS, box, spaces

FRAMES = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)


# ----------------------------------------------------------------------------------------------------
# Generalized Advantage Estimation
# ----------------------------------------------------------------------------------------------------
def gae_reference(rewards, values, terminations, dones, gamma, lam):
    """GAE by its definition: A_t = sum_l (gamma * lam)^l delta_{t+l}, summed until the episode ends."""
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            total, coef = 0.0, 1.0
            for k in range(t, T):
                total += coef * (rewards[k, n] + gamma * values[k + 1, n] * (1 - terminations[k, n]) - values[k, n])
                if dones[k, n]:
                    break
                coef *= gamma * lam
            adv[t, n] = total
    return adv


def random_rollout(T=12, N=3, seed=0, p_end=0.2):
    rng = np.random.default_rng(seed)
    rewards, values = rng.normal(size=(T, N)), rng.normal(size=(T + 1, N))
    dones = (rng.random((T, N)) < p_end).astype(np.float64)
    terminations = dones * (rng.random((T, N)) < 0.5)  # half of the ends are time-limit cuts
    return rewards, values, terminations, dones


def gae(ppo, rewards, values, terminations, dones, gamma, lam):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return ppo.compute_gae(t(rewards), t(values), t(terminations), t(dones), gamma, lam).numpy()


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.0), (0.97, 1.0), (1.0, 1.0)])
def test_gae_matches_brute_force(ppo, gamma, lam):
    r, v, term, done = random_rollout()
    np.testing.assert_allclose(
        gae(ppo, r, v, term, done, gamma, lam), gae_reference(r, v, term, done, gamma, lam), rtol=1e-10, atol=1e-10
    )


def test_gae_lambda_zero_is_td_error(ppo):
    r, v, term, done = random_rollout()
    np.testing.assert_allclose(gae(ppo, r, v, term, done, 0.9, 0.0), r + 0.9 * v[1:] * (1 - term) - v[:-1], atol=1e-12)


def test_gae_lambda_one_is_discounted_return_minus_value(ppo):
    r, v, term, done = random_rollout(p_end=0.0)
    T, gamma = r.shape[0], 0.95
    expected = [sum(gamma ** (k - t) * r[k] for k in range(t, T)) + gamma ** (T - t) * v[T] - v[t] for t in range(T)]
    np.testing.assert_allclose(gae(ppo, r, v, term, done, gamma, 1.0), np.array(expected), atol=1e-10)


def test_gae_result_is_detached(ppo):
    v = torch.randn(6, 2, requires_grad=True)
    assert not ppo.compute_gae(torch.ones(5, 2), v * 2, torch.zeros(5, 2), torch.zeros(5, 2), 0.99, 0.95).requires_grad


# ----------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------
def loss_of(ppo, ratio, adv, **kw):
    newlogp = torch.tensor([math.log(ratio)], requires_grad=True)
    kw = {"clip_coef": 0.2, "vf_coef": 0.0, "ent_coef": 0.0, "norm_adv": False, "clip_vloss": False, **kw}
    zeros = torch.zeros(1)
    loss, _ = ppo.ppo_loss(newlogp, zeros, torch.tensor([adv]), zeros, zeros, zeros, zeros, **kw)
    loss.backward()
    return loss.item(), newlogp.grad.item()


@pytest.mark.parametrize(
    "ratio,adv,clipped",
    [
        (1.5, 1.0, True),  # A > 0: past 1 + eps, no incentive to raise the probability further
        (1.21, 1.0, True),
        (0.5, 1.0, False),  # A > 0 below 1 - eps: the unclipped (lower) term still pulls the probability up
        (0.5, -1.0, True),  # A < 0: past 1 - eps, no incentive to lower it further
        (0.79, -1.0, True),
        (1.5, -1.0, False),  # A < 0 above 1 + eps: still pushed down
        (1.1, 1.0, False),  # inside the clip range: ordinary policy gradient
        (0.9, -1.0, False),
    ],
)
def test_clipped_surrogate_gradient(ppo, ratio, adv, clipped):
    loss, grad = loss_of(ppo, ratio, adv)
    assert loss == pytest.approx(-min(ratio * adv, min(max(ratio, 0.8), 1.2) * adv))
    assert grad == (0.0 if clipped else pytest.approx(-adv * ratio))  # d(-A r)/d log pi = -A r


def surrogate_by_hand(ratio, adv, clip=0.2):
    """Per sample: the pessimistic clipped surrogate (as a loss) and its derivative in the log-prob."""
    unclipped, clipped = -adv * ratio, -adv * min(max(ratio, 1 - clip), 1 + clip)
    return (unclipped, -adv * ratio) if unclipped >= clipped else (clipped, 0.0)


def test_policy_loss_is_the_mean_of_the_clipped_surrogate_over_a_batch(ppo):
    ratios = [1.5, 0.5, 0.5, 1.5, 1.1, 0.9, 1.25, 0.7]
    advs = [1.0, 1.0, -2.0, -0.5, 3.0, -1.0, 2.0, -3.0]
    newlogp = torch.tensor(np.log(ratios), dtype=torch.float64, requires_grad=True)
    oldlogp = torch.tensor([0.3, -0.2, 0.1, 0.0, -1.0, 0.4, 0.2, -0.3], dtype=torch.float64)  # non-zero old log-probs
    z = torch.zeros(8, dtype=torch.float64)
    loss, stats = ppo.ppo_loss(
        newlogp + oldlogp,
        oldlogp,
        torch.tensor(advs, dtype=torch.float64),
        z,
        z,
        z,
        z,
        clip_coef=0.2,
        vf_coef=0.0,
        ent_coef=0.0,
        norm_adv=False,
    )
    loss.backward()
    by_hand = [surrogate_by_hand(r, a) for r, a in zip(ratios, advs)]
    assert loss.item() == pytest.approx(np.mean([v for v, _ in by_hand]), rel=1e-12)
    np.testing.assert_allclose(newlogp.grad.numpy(), [g / len(ratios) for _, g in by_hand], rtol=1e-12, atol=1e-15)
    assert stats["policy_loss"].item() == pytest.approx(loss.item(), rel=1e-12)


def test_value_loss_plain_and_clipped(ppo):
    z, ret, old = torch.zeros(1), torch.tensor([10.0]), torch.tensor([0.0])

    def run(new, clip_vloss):
        newvalue = torch.tensor([new], requires_grad=True)
        loss, stats = ppo.ppo_loss(
            z,
            z,
            z,
            newvalue,
            old,
            ret,
            z,
            clip_coef=0.2,
            vf_coef=1.0,
            ent_coef=0.0,
            norm_adv=False,
            clip_vloss=clip_vloss,
        )
        loss.backward()
        return stats["value_loss"].item(), newvalue.grad.item()

    assert run(0.5, False) == pytest.approx((0.5 * 9.5**2, -9.5))
    # Clipped: the new value may move at most 0.2 from the old one, so the pessimistic (larger) loss is the clipped
    # one, which no longer depends on the new value. Within the clip range both terms agree.
    assert run(0.5, True) == pytest.approx((0.5 * 9.8**2, 0.0))
    assert run(0.1, True) == pytest.approx((0.5 * 9.9**2, -9.9))


def test_value_loss_is_clipped_around_each_old_value(ppo):
    old = torch.tensor([5.0, -3.0, 2.0, 0.5, 10.0], dtype=torch.float64)
    new = torch.tensor([5.5, -3.1, 1.0, 0.6, 9.0], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([8.0, -3.0, 0.0, 0.0, 12.0], dtype=torch.float64)
    z = torch.zeros(5, dtype=torch.float64)
    loss, stats = ppo.ppo_loss(
        z, z, z, new, old, returns, z, clip_coef=0.2, vf_coef=1.0, ent_coef=0.0, norm_adv=False, clip_vloss=True
    )
    loss.backward()
    expected, grads = [], []
    for n, o, g in zip(new.tolist(), old.tolist(), returns.tolist()):
        kept = o + min(max(n - o, -0.2), 0.2)  # within 0.2 of this sample's own old value
        plain, clipped = (n - g) ** 2, (kept - g) ** 2
        expected.append(0.5 * max(plain, clipped))
        grads.append((n - g) / 5 if plain >= clipped else 0.0)
    assert stats["value_loss"].item() == pytest.approx(np.mean(expected), rel=1e-12)
    np.testing.assert_allclose(new.grad.numpy(), grads, rtol=1e-12, atol=1e-15)


def test_entropy_bonus_and_weights(ppo):
    z = torch.zeros(3)
    ent = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    loss, stats = ppo.ppo_loss(
        z, z, z, z, z, torch.ones(3), ent, clip_coef=0.2, vf_coef=0.5, ent_coef=0.01, norm_adv=False
    )
    assert stats["entropy"].item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(-0.01 * 2.0 + 0.5 * 0.5)
    loss.backward()
    np.testing.assert_allclose(ent.grad.numpy(), [-0.01 / 3] * 3, rtol=1e-6)


def test_advantage_normalization_per_minibatch(ppo):
    torch.manual_seed(0)
    adv, newlogp, z = torch.randn(64) * 7 + 3, torch.randn(64) * 0.1, torch.zeros(64)
    kw = dict(clip_coef=0.2, vf_coef=0.0, ent_coef=0.0)
    loss, _ = ppo.ppo_loss(newlogp, z, adv, z, z, z, z, norm_adv=True, **kw)
    ref, _ = ppo.ppo_loss(newlogp, z, (adv - adv.mean()) / (adv.std() + 1e-8), z, z, z, z, norm_adv=False, **kw)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    # Invariant to the advantages' scale and offset, which is the point of normalizing.
    scaled, _ = ppo.ppo_loss(newlogp, z, adv * 100 - 5, z, z, z, z, norm_adv=True, **kw)
    assert scaled.item() == pytest.approx(loss.item(), rel=1e-5)


def test_advantages_are_detached_in_the_loss(ppo):
    # Advantages computed from a critic's output must not send gradient back into that critic.
    critic_out, newlogp, z = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True), torch.zeros(8)
    loss, _ = ppo.ppo_loss(newlogp, z, critic_out * 3, z, z, z, z, clip_coef=0.2, vf_coef=0.0, ent_coef=0.0)
    loss.backward()
    assert critic_out.grad is None and newlogp.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# Diagnostics, and the cross-rank helpers in one process
# ----------------------------------------------------------------------------------------------------
def test_policy_shift_diagnostics(ppo):
    s = ppo.policy_shift(torch.zeros(100), 0.2)
    assert s["approx_kl"].item() == 0 and s["clipfrac"].item() == 0 and s["ess"].item() == pytest.approx(1.0)
    torch.manual_seed(0)
    lr = torch.randn(1000) * 0.3
    s, w = ppo.policy_shift(lr, 0.2), lr.exp().double()
    assert s["ess"].item() == pytest.approx((w.sum() ** 2 / (1000 * (w**2).sum())).item(), rel=1e-5)
    assert s["approx_kl"].item() == pytest.approx(((w - 1) - lr.double()).mean().item(), rel=1e-5)
    assert s["old_approx_kl"].item() == pytest.approx(-lr.mean().item(), rel=1e-5)
    assert s["clipfrac"].item() == pytest.approx(((w - 1).abs() > 0.2).double().mean().item())
    lr = torch.zeros(100)
    lr[0] = 6.0  # one dominant weight collapses the effective sample size
    assert ppo.policy_shift(lr, 0.2)["ess"].item() < 0.1


def test_explained_variance(ppo):
    torch.manual_seed(0)
    y = torch.randn(500) * 4 + 10
    pred = y + torch.randn(500)
    ev, vary = ppo.explained_variance(pred, y).tolist()
    assert ev == pytest.approx((1 - (y - pred).var() / y.var()).item(), rel=1e-5) and vary == 1
    assert ppo.explained_variance(y, y)[0].item() == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full((500,), y.mean()), y)[0].item() == pytest.approx(0.0, abs=1e-6)
    # Returns that barely vary (every episode cut by the time limit at the same value): EV means nothing.
    assert ppo.explained_variance(pred, torch.full((500,), 10.0))[1].item() == 0


def test_cross_rank_helpers_reduce_to_the_plain_formulas_in_one_process(ppo):
    torch.manual_seed(0)
    x = torch.randn(64) * 7 + 3
    torch.testing.assert_close(ppo.normalize(x), (x - x.mean()) / (x.std() + 1e-8))
    assert torch.equal(ppo.all_sum(x), x)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    ppo.average_gradients([p])
    assert p.grad.tolist() == [1.0, 2.0, 3.0]


# ----------------------------------------------------------------------------------------------------
# The copies agree
# ----------------------------------------------------------------------------------------------------
# Every piece of Part A that is the same code in the scripts that have it, and those scripts.
SAME_CODE = {
    **dict.fromkeys(
        [
            "Args.world_size",
            "Args.batch_size",
            "Args.num_iterations",
            "layer_init",
            "lstm_init",
            "recur",
            "compute_gae",
            "mean_std",
            "normalize",
            "ppo_loss",
            "policy_shift",
            "explained_variance",
            "stretches",
            "minibatches",
        ],
        SCRIPTS,
    ),
    # ppo_continuous.py samples a normal distribution and keeps statistics of its envs.
    **dict.fromkeys(["sample", "env_stats", "load_env_stats"], ["ppo_discrete", "ppo_atari"]),
    "ScaleReward": ["ppo_discrete", "ppo_continuous"],  # ppo_discrete.py scales rewards with --lstm
}
# The pieces whose code differs by family: the part of their docstring that every script shares.
SAME_WORDS = {
    "make_env": lambda doc: doc,
    "make_envs": lambda doc: doc.split("\n\n", 1)[1],  # after the family's first paragraph
    "Agent": lambda doc: doc[doc.index("What train() and evaluate() call") :],
    "env_state": lambda doc: doc.split(":")[0],
    "env_stats": lambda doc: doc.split(":")[0],
    "load_env_stats": lambda doc: doc.split(":")[0],
}


def source(script: str, dotted: str) -> str:
    obj = importlib.import_module(script)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return inspect.getsource(obj.fget if isinstance(obj, property) else obj)


@pytest.mark.parametrize("name", SAME_CODE)
def test_shared_code_is_the_same_text_in_every_script(name):
    first, *others = SAME_CODE[name]
    for script in others:
        assert source(script, name) == source(first, name), f"{name} in {script}.py differs from {first}.py"
    # The same text, and through what it calls, the same numbers.
    if name in ("compute_gae", "ppo_loss"):
        expected = same_inputs_outputs(importlib.import_module(first))[name]
        for script in others:
            np.testing.assert_array_equal(same_inputs_outputs(importlib.import_module(script))[name], expected)


@pytest.mark.parametrize("name", SAME_WORDS)
def test_shared_pieces_say_the_same_in_every_script(name):
    words = {s: SAME_WORDS[name](getattr(importlib.import_module(s), name).__doc__) for s in SCRIPTS}
    for script, text in words.items():
        assert text.strip() and text == words[SCRIPTS[0]], f"{name}'s docstring in {script}.py differs"


def same_inputs_outputs(ppo) -> dict:
    """What compute_gae and ppo_loss give in this script for the same random inputs."""
    r, v, term, done = random_rollout(seed=3)
    torch.manual_seed(1)
    loss_inputs = [torch.randn(32) for _ in range(7)]
    return {
        "compute_gae": gae(ppo, r, v, term, done, 0.99, 0.95),
        "ppo_loss": ppo.ppo_loss(*loss_inputs, clip_coef=0.2, vf_coef=0.5, ent_coef=0.01)[0].numpy(),
    }


def below_the_banner(script: str) -> tuple[int, list[str]]:
    """The line number of the Part B banner in a script, and the script's lines from there to the end."""
    banner = "# Part B: running the experiment\n"
    with open(os.path.join(ROOT, script + ".py")) as f:
        text = f.read()
    assert text.count(banner) == 1, f"{script}.py must hold the Part B banner exactly once"
    return text[: text.index(banner)].count("\n") + 1, text[text.index(banner) :].splitlines()


def test_part_b_is_the_same_text_in_every_script():
    first_start, first = below_the_banner(SCRIPTS[0])
    for script in SCRIPTS[1:]:
        start, lines = below_the_banner(script)
        for i, (mine, theirs) in enumerate(zip(lines, first)):
            assert mine == theirs, (
                f"below the banner, {script}.py line {start + i} differs from {SCRIPTS[0]}.py line "
                f"{first_start + i}:\n  {mine!r}\n  {theirs!r}"
            )
        assert len(lines) == len(first), (
            f"{script}.py has {len(lines)} lines below the banner, {SCRIPTS[0]}.py {len(first)}"
        )


# ----------------------------------------------------------------------------------------------------
# Each family's policy: initialization, distributions, sampling
# ----------------------------------------------------------------------------------------------------
def agent_of(name: str, obs_dim: int = 4, action: gym.Space = None, **kw):
    ppo = importlib.import_module(name)
    if name == "ppo_atari":
        return ppo, ppo.Agent(spaces(FRAMES, action or gym.spaces.Discrete(6)))
    default = gym.spaces.Discrete(3) if name == "ppo_discrete" else box(2)
    return ppo, ppo.Agent(spaces(box(obs_dim), action or default, **kw))


def orthogonal(w: torch.Tensor, gain: float) -> bool:
    """Orthogonal rows (or columns, on the smaller side) scaled by the gain: the Gram matrix is gain^2 I."""
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return torch.allclose(gram, gain**2 * torch.eye(len(gram)), atol=1e-5 * max(gain**2, 1e-4), rtol=0)


@pytest.mark.parametrize("name", SCRIPTS)
def test_initialization(name):
    # Orthogonal weights with gain sqrt(2) in the hidden layers, 0.01 for the policy head (a near-uniform first
    # policy), 1 for the value head; zero biases.
    torch.manual_seed(0)
    _, agent = agent_of(name)
    layers = [m for m in agent.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    policy = agent.actor if name == "ppo_atari" else agent.actor[-1] if name == "ppo_discrete" else agent.actor_mean[-1]
    value = agent.critic if name == "ppo_atari" else agent.critic[-1]
    for layer in layers:
        gain = 0.01 if layer is policy else 1.0 if layer is value else 2**0.5
        assert orthogonal(layer.weight.detach().flatten(1), gain), layer
        assert not layer.bias.any()


def test_categorical_sampling_log_probs_and_entropy():
    torch.manual_seed(0)
    ppo, agent = agent_of("ppo_discrete", 3, gym.spaces.Discrete(4))
    with torch.no_grad():
        agent.actor[-1].weight.normal_(0, 2.0)  # a peaked policy, far from the near-uniform first one
        n, obs = 100_000, torch.randn(1, 3).expand(100_000, 3)
        dist = torch.distributions.Categorical(logits=agent.actor(obs[:1]))
        assert dist.probs.max() > 0.5
        freq = torch.bincount(agent.act(obs)[0], minlength=4).float() / n
        # Each frequency within 4 standard errors, sqrt(p (1 - p) / n), of its probability.
        assert ((freq - dist.probs[0]).abs() <= 4 * (dist.probs[0] * (1 - dist.probs[0]) / n).sqrt()).all()
        _, logp, entropy, value, _ = agent.get_action_and_value(obs[:4], torch.arange(4))
        torch.testing.assert_close(logp, dist.log_prob(torch.arange(4)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, dist.entropy().expand(4), rtol=1e-5, atol=1e-6)
        assert value.shape == (4,)
    # Deterministic: the most likely action, every time; here of a near-uniform first policy on 200 states, where a
    # sample would miss it in about 3 of 4.
    _, fresh = agent_of("ppo_discrete", 3, gym.spaces.Discrete(4))
    many = torch.randn(200, 3)
    with torch.no_grad():
        assert torch.equal(fresh.act(many, deterministic=True)[0], fresh.actor(many).argmax(-1))


@pytest.mark.parametrize("name", ["ppo_discrete", "ppo_atari"])
def test_gumbel_max_sampling_follows_a_peaked_distribution(name):
    # Every category's frequency within 4 standard errors of its probability (noise of the wrong sign or scale
    # misses by far more).
    sample = importlib.import_module(name).sample
    logits = torch.tensor([[4.0, 2.0, 0.0, -1.0, 1.0]])
    probs, n = torch.softmax(logits, -1)[0].double(), 200_000
    torch.manual_seed(0)
    freq = torch.bincount(sample(logits.expand(n, 5)), minlength=5).double() / n
    assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt()).all(), (freq, probs)


def masked_agent(nvec, seed=0):
    """An agent whose policy is far from uniform, so that sampling and log-probs are tested where they differ."""
    torch.manual_seed(seed)
    act = gym.spaces.Discrete(nvec[0]) if len(nvec) == 1 else gym.spaces.MultiDiscrete(nvec)
    _, agent = agent_of("ppo_discrete", N_OBS + sum(nvec), act, mask_size=sum(nvec))
    with torch.no_grad():
        agent.actor[-1].weight.normal_(0, 3.0)
    return agent


def random_masks(rows: int, nvec, seed=0) -> torch.Tensor:
    rng, groups = np.random.default_rng(seed), []
    for n in nvec:
        group = rng.random((rows, n)) < 0.4
        group[np.arange(rows), rng.integers(n, size=rows)] = True
        groups.append(group)
    return torch.as_tensor(np.concatenate(groups, axis=1), dtype=torch.float32)


def test_masked_sampling_never_returns_an_invalid_action():
    agent, masks = masked_agent([5]), random_masks(8, [5])
    obs = torch.cat([torch.randn(8, N_OBS), masks], 1).repeat(5000, 1)
    with torch.no_grad():
        actions, greedy = agent.act(obs)[0], agent.act(obs, deterministic=True)[0]
    assert masks.repeat(5000, 1)[torch.arange(len(obs)), actions].all()
    assert masks.repeat(5000, 1)[torch.arange(len(obs)), greedy].all()
    # Without the mask the same policy picks an invalid action often: the test can tell the two apart.
    _, free = agent_of("ppo_discrete", N_OBS, gym.spaces.Discrete(5))
    free.actor.load_state_dict(agent.actor.state_dict())
    with torch.no_grad():
        picked = free.act(obs[:, :N_OBS])[0]
    assert (1 - masks.repeat(5000, 1)[torch.arange(len(picked)), picked]).mean() > 0.1


def test_masked_log_probs_and_entropy_match_a_categorical_over_the_valid_actions():
    agent, masks = masked_agent([5]), random_masks(16, [5], seed=1)
    obs = torch.cat([torch.randn(16, N_OBS), masks], 1)
    with torch.no_grad():
        logits = agent.actor(obs[:, :N_OBS])
        for row in range(16):
            valid = masks[row].bool()
            dist = torch.distributions.Categorical(logits=logits[row][valid])
            for k, action in enumerate(valid.nonzero().flatten()):
                _, logp, entropy, _, _ = agent.get_action_and_value(obs[row : row + 1], action.view(1))
                torch.testing.assert_close(logp, dist.log_prob(torch.tensor([k])), rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(entropy, dist.entropy().view(1), rtol=1e-5, atol=1e-6)


def test_the_ratio_of_a_masked_action_is_finite_and_sends_no_nan_gradient():
    old, new, masks = masked_agent([5], seed=0), masked_agent([5], seed=1), random_masks(4, [5], seed=2)
    obs, invalid = torch.cat([torch.randn(4, N_OBS), masks], 1), (1 - masks).argmax(1)  # an action the mask forbids
    with torch.no_grad():
        _, oldlogp, _, _, _ = old.get_action_and_value(obs, invalid)
    _, newlogp, entropy, _, _ = new.get_action_and_value(obs, invalid)
    ratio = (newlogp - oldlogp).exp()
    assert ((1 - masks).sum(1) > 0).any() and torch.isfinite(ratio).all() and torch.isfinite(entropy).all()
    (ratio.sum() + entropy.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in new.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "space", [gym.spaces.MultiDiscrete([3, 5, 2]), gym.spaces.MultiBinary(4)], ids=["MultiDiscrete", "MultiBinary"]
)
def test_multi_dimensional_log_prob_and_entropy_are_sums_over_independent_categoricals(space):
    torch.manual_seed(0)
    ppo, agent = agent_of("ppo_discrete", N_OBS, space)
    with torch.no_grad():
        agent.actor[-1].weight.normal_(0, 3.0)
        obs = torch.randn(64, N_OBS)
        action, logp, entropy, _, _ = agent.get_action_and_value(obs)
        nvec = ppo.choices(space)
        assert action.shape == (64, len(nvec))
        dists = [torch.distributions.Categorical(logits=x) for x in agent.actor(obs).split(nvec, -1)]
        torch.testing.assert_close(
            logp, sum(d.log_prob(action[:, i]) for i, d in enumerate(dists)), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(entropy, sum(d.entropy() for d in dists), rtol=1e-5, atol=1e-5)
        # Each dimension is sampled from its own distribution: compare the frequencies on one observation.
        many = agent.act(obs[:1].expand(20000, N_OBS))[0]
        for i, d in enumerate(dists):
            freq = torch.bincount(many[:, i], minlength=nvec[i]).float() / len(many)
            assert ((freq - d.probs[0]).abs() <= 4 * (d.probs[0] * (1 - d.probs[0]) / len(many)).sqrt() + 1e-3).all()
        assert torch.equal(agent.act(obs, deterministic=True)[0], torch.stack([d.probs.argmax(-1) for d in dists], 1))


def test_gaussian_log_prob_entropy_and_samples():
    torch.manual_seed(0)
    _, agent = agent_of("ppo_continuous", 5, box(3))
    with torch.no_grad():
        agent.actor_logstd.copy_(torch.tensor([[-0.5, 0.0, 0.7]]))
    obs, action = torch.randn(16, 5), torch.randn(16, 3) * 2
    _, logp, entropy, value, _ = agent.get_action_and_value(obs, action)
    dist = torch.distributions.Normal(agent.actor_mean(obs), agent.actor_logstd.exp().expand(16, 3))
    torch.testing.assert_close(logp, dist.log_prob(action).sum(-1))
    torch.testing.assert_close(entropy, dist.entropy().sum(-1))
    assert value.shape == (16,)
    # Samples follow that Gaussian: mean and std within 4 standard errors, std / sqrt(n) and std / sqrt(2n).
    n, std = 40_000, dist.stddev[0].detach()
    samples = agent.act(obs[:1].expand(n, 5))[0].detach()
    assert ((samples.mean(0) - dist.mean[0].detach()).abs() <= 4 * std / math.sqrt(n)).all()
    assert ((samples.std(0) - std).abs() <= 4 * std / math.sqrt(2 * n)).all()
    assert torch.equal(agent.act(obs, deterministic=True)[0], agent.actor_mean(obs))


def test_the_first_policy_has_std_1_whatever_the_state():
    torch.manual_seed(0)
    _, agent = agent_of("ppo_continuous", 5, box(3))
    obs = torch.randn(64, 5) * 10  # very different states: the spread of the actions does not depend on them
    with torch.no_grad():
        _, _, entropy, _, _ = agent.get_action_and_value(obs)
        torch.testing.assert_close(entropy, torch.full((64,), 3 * (0.5 + 0.5 * math.log(2 * math.pi))))
        samples = agent.act(obs[:2].repeat_interleave(40_000, 0))[0].view(2, 40_000, 3)
    # The sample std of n normal draws has a standard error of about std / sqrt(2n): 4 of them as tolerance.
    torch.testing.assert_close(samples.std(1), torch.ones(2, 3), atol=4 / math.sqrt(2 * 40_000), rtol=0)


@pytest.mark.parametrize("name", ["ppo_discrete", "ppo_continuous"])
def test_actor_and_critic_are_separate_networks(name):
    # The policy loss sends no gradient into the critic, and the value loss none into the actor.
    torch.manual_seed(0)
    ppo, agent = agent_of(name)
    actor = [p for n, p in agent.named_parameters() if n.startswith("actor")]
    critic = [p for n, p in agent.named_parameters() if n.startswith("critic")]
    obs, z = torch.randn(16, 4), torch.zeros(16)
    action = agent.get_action_and_value(obs)[0]
    for vf_coef, ent_coef, moved, still in [(0.0, 0.01, actor, critic), (1.0, 0.0, critic, actor)]:
        agent.zero_grad()
        _, newlogp, entropy, newvalue, _ = agent.get_action_and_value(obs, action)
        loss, _ = ppo.ppo_loss(
            newlogp,
            newlogp.detach() - 0.05,
            torch.randn(16) if vf_coef == 0 else z,
            newvalue,
            z,
            torch.randn(16) * 5,
            entropy,
            clip_coef=0.2,
            vf_coef=vf_coef,
            ent_coef=ent_coef,
        )
        loss.backward()
        assert all(p.grad is None or not p.grad.any() for p in still)
        assert all(p.grad is not None and p.grad.any() for p in moved)


def test_the_atari_cnn_shares_its_trunk_and_starts_near_uniform():
    torch.manual_seed(0)
    ppo, agent = agent_of("ppo_atari")
    obs = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    assert agent.network(obs.float()).shape == (3, 512)
    assert agent.get_value(obs).shape == (3,) and agent.act(obs)[0].shape == (3,) and agent.act(obs)[0].max() < 6
    _, logp, entropy, value, _ = agent.get_action_and_value(obs, torch.tensor([0, 1, 5]))
    assert logp.shape == entropy.shape == value.shape == (3,)
    assert torch.allclose(entropy, torch.full((3,), np.log(6)), atol=1e-3)  # 0.01 head gain: near uniform
    # Deterministic: the most likely action, where a sample of this near-uniform policy would miss it in 5 of 6.
    many = torch.randint(0, 256, (16, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(agent.act(many, deterministic=True)[0], agent(many)[0].argmax(-1))
    # A policy far from uniform: log-probs and entropies are those of the categorical of its logits.
    with torch.no_grad():
        agent.actor.weight.normal_(0, 0.3)
        dist = torch.distributions.Categorical(logits=agent(obs)[0])
        actions = torch.tensor([0, 3, 5])
        _, logp, entropy, _, _ = agent.get_action_and_value(obs, actions)
        torch.testing.assert_close(logp, dist.log_prob(actions), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, dist.entropy(), rtol=1e-5, atol=1e-5)
        assert (dist.log_prob(actions) - dist.log_prob(actions * 0)).abs().max() > 0.1  # the action taken matters


def test_frames_are_scaled_to_0_1_inside_the_network():
    torch.manual_seed(0)
    _, agent = agent_of("ppo_atari", action=gym.spaces.Discrete(4))
    obs = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(
            agent(obs)[1], agent.critic(agent.network(obs.float() / 255.0)).squeeze(-1), rtol=1e-4, atol=1e-5
        )
        assert not torch.allclose(agent(obs)[1], agent.critic(agent.network(obs.float())).squeeze(-1), rtol=1e-2)


def test_bfloat16_runs_only_the_trunk_the_heads_and_sampling_stay_fp32():
    torch.manual_seed(0)
    _, agent = agent_of("ppo_atari", action=gym.spaces.Discrete(4))
    obs = torch.randint(0, 256, (6, 4, 84, 84), dtype=torch.uint8)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        assert agent.network(obs.float()).dtype == torch.bfloat16
        logits, value, _ = agent(obs)
        action, logp, _, value2, _ = agent.get_action_and_value(obs)
        _, newlogp, entropy, value3, _ = agent.get_action_and_value(obs, action)
    assert logits.dtype == value.dtype == logp.dtype == value2.dtype == newlogp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, newlogp)
    torch.testing.assert_close(value2, value3)
