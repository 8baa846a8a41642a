"""The maths of PPO, checked against brute-force references, in every script.

The core (GAE, the clipped loss, the policy-shift diagnostics) is repeated in each script by design, so
that each file stands alone; these tests run on every copy and check that the copies agree.
"""

import collections
import copy
import importlib
import inspect
import json
import math
import os

import gymnasium
import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from helpers import ROOT

SCRIPTS = [s for s in ("ppo_discrete", "ppo_continuous", "ppo_atari") if os.path.exists(os.path.join(ROOT, s + ".py"))]


@pytest.fixture(params=SCRIPTS)
def ppo(request):
    return importlib.import_module(request.param)


def gae_reference(rewards, values, terminations, dones, gamma, lam):
    """GAE by its definition: A_t = sum_l (gamma * lam)^l delta_{t+l}, summed until the episode ends."""
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            total, coef = 0.0, 1.0
            for k in range(t, T):
                delta = rewards[k, n] + gamma * values[k + 1, n] * (1 - terminations[k, n]) - values[k, n]
                total += coef * delta
                if dones[k, n]:
                    break
                coef *= gamma * lam
            adv[t, n] = total
    return adv


def random_rollout(T=12, N=3, seed=0, p_end=0.2):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(T, N))
    values = rng.normal(size=(T + 1, N))
    dones = (rng.random((T, N)) < p_end).astype(np.float64)
    terminations = dones * (rng.random((T, N)) < 0.5)  # half of the ends are time-limit cuts
    return rewards, values, terminations, dones


def gae(ppo, rewards, values, terminations, dones, gamma, lam):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return ppo.compute_gae(t(rewards), t(values), t(terminations), t(dones), gamma, lam).numpy()


# ------------------------------------------------------------------------------------------- GAE
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.0), (0.97, 1.0), (1.0, 1.0)])
def test_gae_matches_brute_force(ppo, gamma, lam):
    r, v, term, done = random_rollout()
    np.testing.assert_allclose(gae(ppo, r, v, term, done, gamma, lam), gae_reference(r, v, term, done, gamma, lam),
                               rtol=1e-10, atol=1e-10)


def test_gae_lambda_zero_is_td_error(ppo):
    r, v, term, done = random_rollout()
    td = r + 0.9 * v[1:] * (1 - term) - v[:-1]
    np.testing.assert_allclose(gae(ppo, r, v, term, done, 0.9, 0.0), td, atol=1e-12)


def test_gae_lambda_one_is_discounted_return_minus_value(ppo):
    r, v, term, done = random_rollout(p_end=0.0)
    T, gamma = r.shape[0], 0.95
    expected = np.zeros_like(r)
    for t in range(T):
        ret = sum(gamma ** (k - t) * r[k] for k in range(t, T)) + gamma ** (T - t) * v[T]
        expected[t] = ret - v[t]
    np.testing.assert_allclose(gae(ppo, r, v, term, done, gamma, 1.0), expected, atol=1e-10)


def test_gae_truncation_bootstraps_and_termination_does_not(ppo):
    # One env, an episode ending at step 2 of 5; the value after step 2 is that of the final observation.
    r = np.ones((5, 1))
    v = np.array([[0.5], [0.4], [0.3], [7.0], [0.2], [0.1]])
    done = np.array([[0], [0], [1], [0], [0]], dtype=float)
    gamma = 0.9
    cut = gae(ppo, r, v, np.zeros_like(done), done, gamma, 1.0)
    end = gae(ppo, r, v, done, done, gamma, 1.0)
    # Truncated: 1 + g + g^2 + g^3 V(final obs) - V(s0). Terminated: 1 + g + g^2 - V(s0).
    assert cut[0, 0] == pytest.approx(1 + gamma + gamma**2 + gamma**3 * 7.0 - 0.5)
    assert end[0, 0] == pytest.approx(1 + gamma + gamma**2 - 0.5)
    # Nothing flows back across the episode boundary: what follows step 2 is the same either way.
    assert cut[3, 0] == pytest.approx(end[3, 0])
    assert cut[3, 0] == pytest.approx((1 + gamma * 0.2 - 7.0) + gamma * (1 + gamma * 0.1 - 0.2))


def test_gae_result_is_detached(ppo):
    v = torch.randn(6, 2, requires_grad=True)
    adv = ppo.compute_gae(torch.ones(5, 2), v * 2, torch.zeros(5, 2), torch.zeros(5, 2), 0.99, 0.95)
    assert not adv.requires_grad


# ------------------------------------------------------------------------------------------ loss
def loss_of(ppo, ratio, adv, **kw):
    newlogp = torch.tensor([math.log(ratio)], requires_grad=True)
    kw = {"clip_coef": 0.2, "vf_coef": 0.0, "ent_coef": 0.0, "norm_adv": False, "clip_vloss": False, **kw}
    zeros = torch.zeros(1)
    loss, _ = ppo.ppo_loss(newlogp, zeros, torch.tensor([adv]), zeros, zeros, zeros, zeros, **kw)
    loss.backward()
    return loss.item(), newlogp.grad.item()


@pytest.mark.parametrize("ratio,adv,clipped", [
    (1.5, 1.0, True),    # A > 0: past 1 + eps, no incentive to raise the probability further
    (1.21, 1.0, True),
    (0.5, 1.0, False),   # A > 0 below 1 - eps: the unclipped (lower) term still pulls the probability up
    (0.5, -1.0, True),   # A < 0: past 1 - eps, no incentive to lower it further
    (0.79, -1.0, True),
    (1.5, -1.0, False),  # A < 0 above 1 + eps: still pushed down
    (1.1, 1.0, False),   # inside the clip range: ordinary policy gradient
    (0.9, -1.0, False),
])
def test_clipped_surrogate_gradient(ppo, ratio, adv, clipped):
    loss, grad = loss_of(ppo, ratio, adv)
    expected_loss = -min(ratio * adv, min(max(ratio, 0.8), 1.2) * adv)
    assert loss == pytest.approx(expected_loss)
    if clipped:
        assert grad == 0.0
    else:
        # d(-A r)/d log pi = -A r
        assert grad == pytest.approx(-adv * ratio)


def test_value_loss_plain_and_clipped(ppo):
    z = torch.zeros(1)
    ret, old = torch.tensor([10.0]), torch.tensor([0.0])

    def run(new, clip_vloss):
        newvalue = torch.tensor([new], requires_grad=True)
        loss, stats = ppo.ppo_loss(z, z, z, newvalue, old, ret, z, clip_coef=0.2, vf_coef=1.0, ent_coef=0.0,
                                   norm_adv=False, clip_vloss=clip_vloss)
        loss.backward()
        return stats["value_loss"].item(), newvalue.grad.item()

    assert run(0.5, False) == pytest.approx((0.5 * 9.5**2, -9.5))
    # Clipped: the new value may move at most 0.2 from the old one, so the pessimistic (larger) loss is
    # the clipped one, which no longer depends on the new value.
    assert run(0.5, True) == pytest.approx((0.5 * 9.8**2, 0.0))
    # Within the clip range both terms agree.
    assert run(0.1, True) == pytest.approx((0.5 * 9.9**2, -9.9))


def test_entropy_bonus_and_weights(ppo):
    z = torch.zeros(3)
    ent = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    loss, stats = ppo.ppo_loss(z, z, z, z, z, torch.ones(3), ent, clip_coef=0.2, vf_coef=0.5, ent_coef=0.01,
                               norm_adv=False)
    assert stats["entropy"].item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(-0.01 * 2.0 + 0.5 * 0.5)
    loss.backward()
    np.testing.assert_allclose(ent.grad.numpy(), [-0.01 / 3] * 3, rtol=1e-6)


def test_advantage_normalization_per_minibatch(ppo):
    torch.manual_seed(0)
    adv = torch.randn(64) * 7 + 3
    newlogp, oldlogp = torch.randn(64) * 0.1, torch.zeros(64)
    z = torch.zeros(64)
    kw = dict(clip_coef=0.2, vf_coef=0.0, ent_coef=0.0)
    loss, _ = ppo.ppo_loss(newlogp, oldlogp, adv, z, z, z, z, norm_adv=True, **kw)
    normed = (adv - adv.mean()) / (adv.std() + 1e-8)
    ref, _ = ppo.ppo_loss(newlogp, oldlogp, normed, z, z, z, z, norm_adv=False, **kw)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    # Invariant to the advantages' scale and offset, which is the point of normalizing.
    scaled, _ = ppo.ppo_loss(newlogp, oldlogp, adv * 100 - 5, z, z, z, z, norm_adv=True, **kw)
    assert scaled.item() == pytest.approx(loss.item(), rel=1e-5)


def test_advantages_are_detached_in_the_loss(ppo):
    # Advantages computed from a critic's output must not send gradient back into that critic.
    critic_out = torch.randn(8, requires_grad=True)
    adv = critic_out * 3
    newlogp = torch.randn(8, requires_grad=True)
    z = torch.zeros(8)
    loss, _ = ppo.ppo_loss(newlogp, z, adv, z, z, z, z, clip_coef=0.2, vf_coef=0.0, ent_coef=0.0)
    loss.backward()
    assert critic_out.grad is None
    assert newlogp.grad is not None and newlogp.grad.abs().sum() > 0


def test_policy_shift_diagnostics(ppo):
    lr = torch.zeros(100)
    s = ppo.policy_shift(lr, 0.2)
    assert s["approx_kl"].item() == 0 and s["clipfrac"].item() == 0 and s["ess"].item() == pytest.approx(1.0)
    torch.manual_seed(0)
    lr = torch.randn(1000) * 0.3
    s = ppo.policy_shift(lr, 0.2)
    w = lr.exp().double()
    assert s["ess"].item() == pytest.approx((w.sum() ** 2 / (1000 * (w**2).sum())).item(), rel=1e-5)
    assert s["approx_kl"].item() == pytest.approx(((w - 1) - lr.double()).mean().item(), rel=1e-5)
    assert s["old_approx_kl"].item() == pytest.approx(-lr.mean().item(), rel=1e-5)
    assert s["clipfrac"].item() == pytest.approx(((w - 1).abs() > 0.2).double().mean().item())
    # One dominant weight collapses the effective sample size.
    lr = torch.zeros(100)
    lr[0] = 6.0
    assert ppo.policy_shift(lr, 0.2)["ess"].item() < 0.1


# ------------------------------------------------------- data-parallel pieces, in one process
def test_cross_rank_helpers_reduce_to_the_plain_formulas_in_one_process(ppo):
    torch.manual_seed(0)
    x = torch.randn(64) * 7 + 3
    torch.testing.assert_close(ppo.normalize(x), (x - x.mean()) / (x.std() + 1e-8))
    assert torch.equal(ppo.all_sum(x), x)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    ppo.average_gradients([p])
    assert p.grad.tolist() == [1.0, 2.0, 3.0]


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


# ------------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("name", ["layer_init", "compute_gae", "ppo_loss", "normalize", "policy_shift"])
def test_core_is_the_same_in_every_script(name):
    sources = {s: inspect.getsource(getattr(importlib.import_module(s), name)) for s in SCRIPTS}
    first = sources[SCRIPTS[0]]
    for script, src in sources.items():
        assert src == first, f"{name} in {script}.py differs from {SCRIPTS[0]}.py: keep the copies identical"


BANNER = "# Part B: running the experiment\n"


def below_the_banner(script: str) -> tuple[int, list[str]]:
    """The line number of the banner in a script, and the script's lines from there to the end."""
    with open(os.path.join(ROOT, script + ".py")) as f:
        text = f.read()
    assert text.count(BANNER) == 1, f"{script}.py must hold the Part B banner exactly once"
    start = text[: text.index(BANNER)].count("\n") + 1
    return start, text[text.index(BANNER):].splitlines()


def test_part_b_is_the_same_text_in_every_script():
    first_start, first = below_the_banner(SCRIPTS[0])
    for script in SCRIPTS[1:]:
        start, lines = below_the_banner(script)
        for i, (mine, theirs) in enumerate(zip(lines, first)):
            assert mine == theirs, (f"below the banner, {script}.py line {start + i} differs from {SCRIPTS[0]}.py line "
                                    f"{first_start + i}:\n  {mine!r}\n  {theirs!r}")
        assert len(lines) == len(first), f"{script}.py has {len(lines)} lines below the banner, {SCRIPTS[0]}.py {len(first)}"


def test_core_gives_the_same_numbers_in_every_script():
    r, v, term, done = random_rollout(seed=3)
    mods = [importlib.import_module(s) for s in SCRIPTS]
    ref = gae(mods[0], r, v, term, done, 0.99, 0.95)
    torch.manual_seed(1)
    args = [torch.randn(32) for _ in range(7)]
    ref_loss = mods[0].ppo_loss(*args, clip_coef=0.2, vf_coef=0.5, ent_coef=0.01)[0]
    for m in mods[1:]:
        np.testing.assert_array_equal(gae(m, r, v, term, done, 0.99, 0.95), ref)
        assert torch.equal(m.ppo_loss(*args, clip_coef=0.2, vf_coef=0.5, ent_coef=0.01)[0], ref_loss)


# -------------------------------------------------------------------- tiny training runs of every script
TINY_ENV = {"ppo_discrete": "CartPole-v1", "ppo_continuous": "InvertedPendulum-v5", "ppo_atari": "BreakoutNoFrameskip-v4"}


def tiny(ppo, **kw):
    """Two updates of 3 envs x 16 steps on a real env of the script's kind."""
    base = dict(env_id=TINY_ENV[ppo.SCRIPT], num_envs=3, num_steps=16, total_timesteps=96, num_minibatches=2,
                update_epochs=2, progress=False, run_name="tiny", cuda=False)
    return ppo.Args(**{**base, **kw})


def logged(run_dir: str, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(run_dir)
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)]


def test_envs_step_as_one_batch_and_each_update_learns_from_all_of_them(ppo, monkeypatch):
    envs = ppo.make_envs(ppo.Args(env_id=TINY_ENV[ppo.SCRIPT]), 3)
    obs, _ = envs.reset(seed=0)
    envs.action_space.seed(0)
    obs, reward, terminated, truncated, _ = envs.step(envs.action_space.sample())  # one call, 3 actions
    assert len(obs) == len(reward) == len(terminated) == len(truncated) == 3
    envs.close()

    rollouts, original = [], ppo.compute_gae

    def spy(rewards, *rest):
        rollouts.append(tuple(rewards.shape))
        return original(rewards, *rest)

    monkeypatch.setattr(ppo, "compute_gae", spy)
    result = ppo.train(tiny(ppo))
    assert rollouts == [(16, 3)] * 2  # each update: T x N transitions
    assert result["global_step"] == 3 * 16 * 2


def test_adam_epsilon_is_1e_5(ppo):
    ppo.train(tiny(ppo, total_timesteps=48, checkpoint_every=1))
    ckpt = torch.load("runs/tiny/checkpoint.pt", weights_only=False)
    groups = ckpt["optimizer"]["param_groups"]
    assert groups and all(g["eps"] == 1e-5 for g in groups)  # not torch's default 1e-8


def test_gradients_are_clipped_to_max_grad_norm_all_together(ppo):
    # The norm of all gradients as the optimizer is about to apply them. The raw gradients of these
    # losses are far larger than 1e-3, so every step must apply them scaled down to exactly that norm
    # as a whole: without clipping the norms would be larger, and clipping each parameter's gradient on
    # its own would leave a total norm above 1e-3.
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record)  # called before every optimizer.step()
    try:
        ppo.train(tiny(ppo, total_timesteps=48, max_grad_norm=1e-3))
    finally:
        handle.remove()
    assert len(norms) == 2 * 2  # update_epochs x num_minibatches steps
    assert norms == pytest.approx([1e-3] * len(norms), rel=1e-3)


def test_target_kl_stops_the_update_epochs_early(ppo):
    ppo.train(tiny(ppo, run_name="all", update_epochs=3, learning_rate=1e-2))
    ppo.train(tiny(ppo, run_name="early", update_epochs=3, learning_rate=1e-2, target_kl=1e-8))
    assert logged("runs/all", "losses/epochs") == [3, 3]
    # After one epoch the policy has moved by more than 1e-8: the other epochs are skipped.
    assert logged("runs/early", "losses/epochs") == [1, 1]


def test_a_save_that_fails_midway_leaves_the_previous_file_intact(ppo, monkeypatch):
    ppo.save_atomic({"version": 1, "weights": torch.ones(100)}, "file.pt")
    real_save = torch.save

    def crash_midway(obj, path):
        real_save(obj, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)  # half written, as when the disk fills or the power goes
        raise OSError("No space left on device")

    monkeypatch.setattr(ppo.torch, "save", crash_midway)
    with pytest.raises(OSError):
        ppo.save_atomic({"version": 2, "weights": torch.zeros(100)}, "file.pt")
    data = torch.load("file.pt", weights_only=True)
    assert data["version"] == 1 and torch.equal(data["weights"], torch.ones(100))


# ---------------------------------------------------------------------- the loss on batches of several samples
def surrogate_by_hand(ratio, adv, clip=0.2):
    """Per sample: the pessimistic clipped surrogate (as a loss) and its derivative in the log-prob."""
    unclipped, clipped = -adv * ratio, -adv * min(max(ratio, 1 - clip), 1 + clip)
    if unclipped >= clipped:
        return unclipped, -adv * ratio  # d(-A r)/d log pi = -A r
    return clipped, 0.0  # the clipped term wins: it does not depend on the policy


def test_policy_loss_is_the_mean_of_the_clipped_surrogate_over_a_batch(ppo):
    ratios = [1.5, 0.5, 0.5, 1.5, 1.1, 0.9, 1.25, 0.7]
    advs = [1.0, 1.0, -2.0, -0.5, 3.0, -1.0, 2.0, -3.0]
    newlogp = torch.tensor(np.log(ratios), dtype=torch.float64, requires_grad=True)
    oldlogp = torch.tensor([0.3, -0.2, 0.1, 0.0, -1.0, 0.4, 0.2, -0.3], dtype=torch.float64)  # non-zero old log-probs
    z = torch.zeros(8, dtype=torch.float64)
    loss, stats = ppo.ppo_loss(newlogp + oldlogp, oldlogp, torch.tensor(advs, dtype=torch.float64), z, z, z, z,
                               clip_coef=0.2, vf_coef=0.0, ent_coef=0.0, norm_adv=False)
    loss.backward()
    by_hand = [surrogate_by_hand(r, a) for r, a in zip(ratios, advs)]
    assert loss.item() == pytest.approx(np.mean([l for l, _ in by_hand]), rel=1e-12)
    np.testing.assert_allclose(newlogp.grad.numpy(), [g / len(ratios) for _, g in by_hand], rtol=1e-12, atol=1e-15)
    assert stats["policy_loss"].item() == pytest.approx(loss.item(), rel=1e-12)


def test_value_loss_is_clipped_around_each_old_value(ppo):
    old = torch.tensor([5.0, -3.0, 2.0, 0.5, 10.0], dtype=torch.float64)
    new = torch.tensor([5.5, -3.1, 1.0, 0.6, 9.0], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([8.0, -3.0, 0.0, 0.0, 12.0], dtype=torch.float64)
    z = torch.zeros(5, dtype=torch.float64)
    loss, stats = ppo.ppo_loss(z, z, z, new, old, returns, z, clip_coef=0.2, vf_coef=1.0, ent_coef=0.0,
                               norm_adv=False, clip_vloss=True)
    loss.backward()
    expected, grads = [], []
    for n, o, g in zip(new.tolist(), old.tolist(), returns.tolist()):
        kept = o + min(max(n - o, -0.2), 0.2)  # within 0.2 of this sample's own old value
        plain, clipped = (n - g) ** 2, (kept - g) ** 2
        expected.append(0.5 * max(plain, clipped))
        grads.append((n - g) / 5 if plain >= clipped else 0.0)
    assert stats["value_loss"].item() == pytest.approx(np.mean(expected), rel=1e-12)
    np.testing.assert_allclose(new.grad.numpy(), grads, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------- the update loop, end to end
def test_the_learning_rate_decays_linearly_from_the_full_rate_to_zero(ppo):
    ppo.train(tiny(ppo, total_timesteps=4 * 48, learning_rate=1e-3))
    np.testing.assert_allclose(logged("runs/tiny", "charts/learning_rate"), [1e-3, 0.75e-3, 0.5e-3, 0.25e-3], rtol=1e-6)


def updates_seen(ppo, monkeypatch, **kw) -> list[torch.Tensor]:
    """Train a tiny run; return the observations of every minibatch the update learns from, in order."""
    seen, original = [], ppo.Agent.get_action_and_value

    def record(self, obs, action=None):
        if torch.is_grad_enabled():  # the update's calls; the rollout's run without autograd
            seen.append(obs.detach().clone())
        return original(self, obs, action)

    monkeypatch.setattr(ppo.Agent, "get_action_and_value", record)
    ppo.train(tiny(ppo, **kw))
    return seen


def rows(obs: torch.Tensor) -> list[bytes]:
    return [row.numpy().tobytes() for row in obs]


def test_each_epoch_shuffles_the_batch_into_minibatches_that_cover_it(ppo, monkeypatch):
    seen = updates_seen(ppo, monkeypatch, total_timesteps=48, update_epochs=3, num_minibatches=2)
    assert len(seen) == 3 * 2
    epochs = [seen[0:2], seen[2:4], seen[4:6]]
    batch = sorted(rows(torch.cat(epochs[0])))
    for epoch in epochs:
        assert sorted(rows(torch.cat(epoch))) == batch  # every epoch learns from the whole batch, once
        assert abs(len(epoch[0]) - len(epoch[1])) <= 1
    # ... in another order each time: the first minibatches of the epochs are not the same samples.
    assert len({tuple(rows(epoch[0])) for epoch in epochs}) == 3


CUT_ENV = {"ppo_discrete": "TestClock-v0", "ppo_continuous": "TestClockContinuous-v0",
           "ppo_atari": "TestBreakoutCut-v0"}


@pytest.fixture(scope="module", params=SCRIPTS)
def cut_run(request, tmp_path_factory):
    """A short run on an env cut by a time limit, whose final and reset observations differ: what the vector
    env returned at every step, what GAE got and gave, and what the update learned from."""
    from helpers import register_test_envs

    register_test_envs()
    ppo = importlib.import_module(request.param)
    returned, gae_calls, trained, agents = [], [], [], []
    make_envs, compute_gae, get_action_and_value = ppo.make_envs, ppo.compute_gae, ppo.Agent.get_action_and_value
    init = ppo.Agent.__init__

    class Recorder(gymnasium.vector.VectorWrapper):
        def reset(self, **kw):
            obs, info = self.env.reset(**kw)
            returned.append((obs.copy(), np.zeros(len(obs), bool), np.zeros(len(obs), bool)))
            return obs, info

        def step(self, actions):
            obs, reward, terminated, truncated, info = self.env.step(actions)
            returned.append((obs.copy(), terminated.copy(), truncated.copy()))
            return obs, reward, terminated, truncated, info

    def spy_gae(rewards, values, terminations, dones, gamma, gae_lambda):
        advantages = compute_gae(rewards, values, terminations, dones, gamma, gae_lambda)
        gae_calls.append((rewards.clone(), values.clone(), terminations.clone(), dones.clone(), advantages.clone(),
                          copy.deepcopy(agents[-1]), gamma))
        return advantages

    def spy_update(self, obs, action=None):
        if torch.is_grad_enabled():
            trained.append(rows(obs.detach()))
        return get_action_and_value(self, obs, action)

    def keep(self, envs):
        init(self, envs)
        agents.append(self)

    folder = tmp_path_factory.mktemp("cut")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ppo, "make_envs", lambda *a, **kw: Recorder(make_envs(*a, **kw)))
            mp.setattr(ppo, "compute_gae", spy_gae)
            mp.setattr(ppo.Agent, "get_action_and_value", spy_update)
            mp.setattr(ppo.Agent, "__init__", keep)
            steps = 32 if ppo.SCRIPT == "ppo_atari" else 40
            args = tiny(ppo, env_id=CUT_ENV[ppo.SCRIPT], num_steps=steps, total_timesteps=3 * 3 * steps,
                        gamma=0.9, learning_rate=1e-3)
            ppo.train(args)
    finally:
        os.chdir(cwd)
    return ppo, returned, gae_calls, trained, args


def test_a_time_limit_bootstraps_from_the_final_observation_end_to_end(cut_run):
    # At a cut (truncated, not terminated) the advantage is r + gamma * V(final observation) - V(s): the
    # value of what the env returned at that step, not of the next episode's first observation.
    ppo, returned, gae_calls, _, args = cut_run
    T, checked, apart = args.num_steps, 0, 0
    for r, (rewards, values, terminations, dones, advantages, agent, gamma) in enumerate(gae_calls):
        for t, env in zip(*np.nonzero(dones.numpy())):
            step = 1 + r * T + t  # returned[0] is the reset
            final, terminated, truncated = (x[env] for x in returned[step])
            if not truncated or terminated:
                continue
            assert terminations[t, env] == 0, "a time-limit cut was treated as a terminal state"
            with torch.no_grad():
                v_final = agent.get_value(torch.as_tensor(final[None], dtype=ppo.OBS_DTYPE)).item()
                if step + 1 < len(returned):
                    first = returned[step + 1][0][env]  # the next episode's first observation
                    v_first = agent.get_value(torch.as_tensor(first[None], dtype=ppo.OBS_DTYPE)).item()
                    apart += abs(v_final - v_first) > 1e-3
            expected = rewards[t, env].item() + gamma * v_final - values[t, env].item()
            assert advantages[t, env].item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
            checked += 1
    assert checked >= 3 and apart >= 1, (checked, apart)  # the test saw cuts, and could tell the two values apart


def test_the_step_that_only_resets_an_env_is_never_trained_on(cut_run):
    # Every epoch learns from exactly the rollout's transitions: each step except those that start from an
    # episode's final observation (they only reset the env), as returned by the vector env.
    ppo, returned, _, trained, args = cut_run
    T, per_epoch = args.num_steps, args.num_minibatches
    dtype = np.float32 if ppo.OBS_DTYPE == torch.float32 else np.uint8
    resets = 0
    for r in range(len(trained) // (per_epoch * args.update_epochs)):
        expected = collections.Counter()
        for t in range(T):
            obs, terminated, truncated = returned[r * T + t]  # what rollout step t starts from
            for env in range(len(obs)):
                if terminated[env] or truncated[env]:
                    resets += 1
                else:
                    expected[obs[env].astype(dtype).tobytes()] += 1
        for epoch in range(args.update_epochs):
            start = (r * args.update_epochs + epoch) * per_epoch
            learned = collections.Counter(row for call in trained[start:start + per_epoch] for row in call)
            assert learned == expected
    assert resets >= 3  # the test saw reset steps to leave out


def run_with_a_nan_loss(ppo, monkeypatch, match: str, **kw) -> tuple[dict, list[dict]]:
    """Train with the third minibatch's loss NaN, until the run stops; returns the agent's final parameters and
    its parameters after every optimizer step."""
    agents, after_step, loss_calls = [], [], []
    init, ppo_loss = ppo.Agent.__init__, ppo.ppo_loss
    monkeypatch.setattr(ppo.Agent, "__init__", lambda self, envs: init(self, envs) or agents.append(self))

    def nan_on_the_third(*a, **kw):
        loss, stats = ppo_loss(*a, **kw)
        loss_calls.append(1)
        return (loss * float("nan") if len(loss_calls) == 3 else loss), stats

    monkeypatch.setattr(ppo, "ppo_loss", nan_on_the_third)
    handle = register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: after_step.append(copy.deepcopy(agents[0].state_dict())))
    try:
        with pytest.raises(ppo.TrainingDiverged, match=match):
            ppo.train(tiny(ppo, **kw))
    finally:
        handle.remove()
    return agents[0].state_dict(), after_step


def test_a_nan_loss_stops_the_run_before_the_bad_update_is_applied(ppo, monkeypatch):
    # The third minibatch's loss is NaN: training stops, and the parameters are those after the second step.
    # It is the run's only update: the run still did not finish.
    state, after_step = run_with_a_nan_loss(ppo, monkeypatch, "the loss became nan", total_timesteps=48)
    assert len(after_step) == 2  # two good steps, and no third
    assert all(torch.equal(state[k], after_step[-1][k]) for k in state)
    assert json.load(open("runs/tiny/summary.json"))["finished"] is False


@pytest.mark.parametrize("name", ["ppo_discrete", "ppo_continuous"])
def test_actor_and_critic_are_separate_networks(name):
    # The policy loss sends no gradient into the critic, and the value loss none into the actor.
    ppo = importlib.import_module(name)
    from helpers import box, spaces

    torch.manual_seed(0)
    act = gymnasium.spaces.Discrete(3) if name == "ppo_discrete" else box(2)
    agent = ppo.Agent(spaces(box(4), act))
    actor = [p for n, p in agent.named_parameters() if n.startswith("actor")]
    critic = [p for n, p in agent.named_parameters() if n.startswith("critic")]
    obs = torch.randn(16, 4)
    action, newlogp, entropy, newvalue = agent.get_action_and_value(obs)
    z = torch.zeros(16)
    for vf_coef, ent_coef, moved, still in [(0.0, 0.01, actor, critic), (1.0, 0.0, critic, actor)]:
        agent.zero_grad()
        _, newlogp, entropy, newvalue = agent.get_action_and_value(obs, action)
        advantages = torch.randn(16) if vf_coef == 0 else z
        loss, _ = ppo.ppo_loss(newlogp, newlogp.detach() - 0.05, advantages, newvalue, z, torch.randn(16) * 5, entropy,
                               clip_coef=0.2, vf_coef=vf_coef, ent_coef=ent_coef)
        loss.backward()
        assert all(p.grad is None or not p.grad.any() for p in still)
        assert all(p.grad is not None and p.grad.any() for p in moved)


@pytest.mark.parametrize("name", ["ppo_discrete", "ppo_atari"])
def test_gumbel_max_sampling_follows_a_peaked_distribution(name):
    # Logits far from uniform: every category's frequency within 4 standard errors of its probability
    # (a wrong sampler, e.g. noise of the wrong sign or scale, misses by far more).
    sample = importlib.import_module(name).sample
    logits = torch.tensor([[4.0, 2.0, 0.0, -1.0, 1.0]])
    probs = torch.softmax(logits, -1)[0]
    n = 200_000
    torch.manual_seed(0)
    freq = torch.bincount(sample(logits.expand(n, 5)), minlength=5).double() / n
    standard_error = (probs * (1 - probs) / n).sqrt().double()
    assert ((freq - probs.double()).abs() <= 4 * standard_error).all(), (freq, probs)


# ---------------------------------------------------------------------- the GPU path, run on the CPU
class NoEvent:
    """torch.cuda.Event's part that the deferred logs use, for running them on the CPU."""

    def record(self):
        pass

    def synchronize(self):
        pass


def deferred(ppo, monkeypatch):
    """Run the scripts as on a GPU: the logs read one update late, a non-finite loss left to fused Adam."""
    init = ppo.Run.__init__

    def as_on_a_gpu(self, *a, **kw):
        init(self, *a, **kw)
        self.deferred = True

    monkeypatch.setattr(ppo.Run, "__init__", as_on_a_gpu)
    monkeypatch.setattr(ppo.torch.cuda, "Event", NoEvent)


def test_on_a_gpu_the_logs_are_the_same_read_one_update_later(ppo, monkeypatch):
    ppo.train(tiny(ppo, run_name="now", total_timesteps=3 * 48))
    deferred(ppo, monkeypatch)
    ppo.train(tiny(ppo, run_name="later", total_timesteps=3 * 48))
    for tag in ("losses/policy_loss", "losses/value_loss", "losses/approx_kl", "losses/explained_variance"):
        assert logged("runs/later", tag) == logged("runs/now", tag) and len(logged("runs/now", tag)) == 3


def test_on_a_gpu_a_nan_loss_is_skipped_by_adam_and_stops_the_run(ppo, monkeypatch):
    # No host sync per minibatch: fused Adam skips the bad step and every later one, and the update's logs
    # stop the run. The parameters are those after the last good step.
    deferred(ppo, monkeypatch)
    state, after_step = run_with_a_nan_loss(ppo, monkeypatch, "in update 1 ", total_timesteps=4 * 48,
                                            checkpoint_every=1)
    assert not os.path.exists("runs/tiny/checkpoint.pt")  # the update's loss is looked at before its checkpoint
    assert len(after_step) > 3  # the steps went on being called, skipped
    for snapshot in after_step[2:]:
        assert all(torch.equal(snapshot[k], after_step[1][k]) for k in state)
    assert all(torch.equal(state[k], after_step[1][k]) and torch.isfinite(state[k]).all() for k in state)


def test_compiled_and_eager_runs_agree(ppo, capsys):
    # torch.compile fuses and reorders float32 arithmetic, so the same updates differ in the last bits: the
    # parameters differ by a few 1e-6 of their largest value (measured after 2 updates of 2 epochs x 2
    # minibatches: 5e-7 for the MLPs, 4e-6 for the CNN); another action or a missing term moves them far more.
    # Compiled code draws its random numbers (the sampling noise) with a generator of its own unless told to
    # use torch's: told so here, both runs sample the same actions.
    import torch._inductor.config

    eager = ppo.train(tiny(ppo, run_name="eager", total_timesteps=144))
    with torch._inductor.config.patch(fallback_random=True):
        compiled = ppo.train(tiny(ppo, run_name="compiled", total_timesteps=144, compile=True))
    for k, v in eager["agent"].state_dict().items():
        torch.testing.assert_close(compiled["agent"].state_dict()[k], v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logged("runs/compiled", "losses/value_loss"), logged("runs/eager", "losses/value_loss"),
                               rtol=1e-5)
    assert "torch.compile: the first two updates took" in capsys.readouterr().err
