"""PPO from pixels on Atari (ALE), in one file.

    python ppo_atari.py                             # BreakoutNoFrameskip-v4, 10M steps, logs in runs/
    python ppo_atari.py --env-id ALE/Pong-v5 --total-timesteps 2000000 --save-model
    python ppo_atari.py --eval-checkpoint runs/<run>/agent.pt --eval-episodes 10
    python ppo_atari.py --help                      # every option

Read top to bottom: options, environments, network, GAE, loss, training loop.
Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347); the implementation
details follow Huang et al. 2022, "The 37 Implementation Details of PPO" (ICLR blog track), including
its nine for Atari: no-op reset, frame skip with max-pooling, end-of-life as end of the episode for
learning, FIRE on reset, reward sign clipping, 84x84 grayscale, 4 stacked frames, the Nature CNN shared
by actor and critic, and inputs scaled to [0, 1].
"""

import csv
import difflib
import json
import os
import pickle
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Optional

import cloudpickle  # comes with gymnasium; pickles the vector env (with its env factories) for exact resume
import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

SCRIPT = "ppo_atari"
gym.register_envs(ale_py)  # the ROMs ship inside the ale-py wheel: ALE/<Game>-v5 and <Game>NoFrameskip-v4


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = SCRIPT
    """name of the experiment, part of the run name"""
    seed: int = 1
    """random seed; env i is seeded with seed + i (under torchrun, rank r uses seed + r, its envs seed + r * num_envs + i)"""
    run_name: Optional[str] = None
    """folder name under runs/ and videos/ (default: <env_id>__<exp_name>__<seed>__<unix time>)"""
    torch_deterministic: bool = True
    """ask torch for deterministic kernels (the same seed then gives the same numbers)"""
    cuda: bool = True
    """run the network on a CUDA GPU if there is one (falls back to the CPU with a note)"""
    torch_threads: int = 0
    """CPU threads for torch (0: all cores; convolutions use them)"""
    bf16: bool = False
    """run the network in bfloat16 autocast (about 2x faster on CPUs with AMX or AVX512-BF16; numbers differ slightly)"""
    track: bool = False
    """also log to Weights & Biases (set WANDB_MODE=offline to log without network)"""
    wandb_project_name: str = "ppo"
    """Weights & Biases project"""
    wandb_entity: Optional[str] = None
    """Weights & Biases team or user (default: your own)"""
    capture_video: bool = False
    """record episodes of env 0 to videos/<run_name>/"""
    progress: bool = True
    """show a live progress bar (plain progress lines when output is not a terminal)"""
    save_model: bool = False
    """save the trained agent and its options to runs/<run_name>/agent.pt"""
    checkpoint_every: int = 0
    """write runs/<run_name>/checkpoint.pt every this many updates (0: only on Ctrl-C)"""
    resume: Optional[str] = None
    """continue training from this checkpoint file; its options are the defaults"""
    eval_checkpoint: Optional[str] = None
    """evaluate this saved agent or checkpoint instead of training, then exit"""
    eval_episodes: int = 10
    """episodes to play with --eval-checkpoint"""

    # --- algorithm ---
    env_id: str = "BreakoutNoFrameskip-v4"
    """an Atari game: <Game>NoFrameskip-v4 or ALE/<Game>-v5"""
    sticky_actions: Optional[float] = None
    """probability that the emulator repeats the previous action (default: the id's own, 0 for v4, 0.25 for v5)"""
    total_timesteps: int = 10_000_000
    """environment steps to train for, summed over all envs (and all ranks under torchrun)"""
    learning_rate: float = 2.5e-4
    """Adam step size at the start of training"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over training"""
    num_envs: int = 8
    """parallel environments per process (under torchrun each rank runs this many)"""
    num_steps: int = 128
    """steps per env in each rollout (batch = num_envs * num_steps transitions)"""
    gamma: float = 0.99
    """discount factor, in [0, 1]"""
    gae_lambda: float = 0.95
    """GAE lambda, in [0, 1]: 0 gives one-step TD advantages, 1 Monte Carlo returns minus values"""
    num_minibatches: int = 4
    """minibatches per epoch; must divide the batch"""
    update_epochs: int = 4
    """passes (K epochs) over each batch"""
    norm_adv: bool = True
    """normalize advantages to zero mean, unit std within each minibatch"""
    clip_coef: float = 0.1
    """surrogate clipping: the ratio is kept in [1 - clip_coef, 1 + clip_coef]"""
    clip_vloss: bool = True
    """clip the value update around the old value by clip_coef as well"""
    ent_coef: float = 0.01
    """weight of the entropy bonus"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    max_grad_norm: float = 0.5
    """clip the global gradient norm to this"""
    target_kl: Optional[float] = None
    """stop the update epochs early when the mean approx KL of an epoch exceeds this (default: off)"""

    # --- sizes derived from the options above, in one place ---
    @property
    def world_size(self) -> int:
        # Processes training together: torchrun sets WORLD_SIZE; a plain run is 1.
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def batch_size(self) -> int:
        # Per process; a data-parallel update learns from world_size times as many transitions.
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_iterations(self) -> int:
        return self.total_timesteps // (self.batch_size * self.world_size)


class UsageError(Exception):
    """Bad input from the user: printed as one line, never as a traceback."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: training stops instead of learning from garbage."""


def check_args(args: Args) -> None:
    """Reject bad options before anything is built, naming the value and what would work."""
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "eval_episodes"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} is {getattr(args, name)}; it must be a positive integer")
    for name in ("learning_rate", "clip_coef", "max_grad_norm"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} is {getattr(args, name)}; it must be positive")
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} is {getattr(args, name)}; it must lie in [0, 1] (typical: 0.99, 0.95)")
    if args.sticky_actions is not None and not 0.0 <= args.sticky_actions < 1.0:
        raise UsageError(f"--sticky-actions is {args.sticky_actions}; it must lie in [0, 1) (0.25 is the ALE v5 default)")
    for name in ("ent_coef", "vf_coef", "checkpoint_every", "torch_threads"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} is {getattr(args, name)}; it must be 0 or more")
    if args.target_kl is not None and not args.target_kl > 0:
        raise UsageError(f"--target-kl is {args.target_kl}; it must be positive (typical: 0.01 to 0.05), or left out")
    if args.batch_size % args.num_minibatches:
        raise UsageError(
            f"the batch (num_envs * num_steps = {args.num_envs} * {args.num_steps} = {args.batch_size}) does not split into "
            f"--num-minibatches {args.num_minibatches}; choose a divisor of {args.batch_size}, e.g. {best_divisor(args.batch_size, args.num_minibatches)}"
        )
    if args.minibatch_size < 2:
        raise UsageError(f"minibatches of {args.minibatch_size} transition(s) are too small to normalize advantages; use fewer --num-minibatches")
    if args.num_iterations == 0:
        raise UsageError(f"--total-timesteps {args.total_timesteps} is less than one batch ({args.batch_size * args.world_size} = "
                         f"num_envs * num_steps{' * ranks' if args.world_size > 1 else ''}); raise it or shrink the batch")
    check_env_id(args.env_id)


def best_divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - near))


def check_env_id(env_id: str) -> None:
    if env_id in gym.registry:
        entry = str(gym.registry[env_id].entry_point)
        if "ale_py" in entry:
            return
        if "mujoco" in entry:
            raise UsageError(f"--env-id {env_id} is not an Atari game; train it with ppo_continuous.py")
        raise UsageError(f"--env-id {env_id} is not an Atari game; train it with ppo_discrete.py "
                         "(or ppo_continuous.py for continuous actions)")
    atari = [k for k in gym.registry if "ale_py" in str(gym.registry[k].entry_point)]
    close = difflib.get_close_matches(env_id, atari, n=3)
    hint = f"did you mean {' or '.join(close)}?" if close else "see gymnasium.registry for the known ids"
    raise UsageError(f"--env-id {env_id} is not a registered gymnasium environment; {hint}")


# ----------------------------------------------------------------------------------------------------
# Environments
# ----------------------------------------------------------------------------------------------------
class FireOnReset(gym.Wrapper):
    """Press FIRE when a game (or a new life) waits for it, as Breakout does (detail 4 for Atari).

    The classic setup resets on every lost life and fires on every reset; here the emulator plays on
    through lost lives, so a lost life is followed by FIRE in the same way.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.needs_fire = env.unwrapped.get_action_meanings()[1:2] == ["FIRE"]

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        if self.needs_fire:
            obs, _, terminated, truncated, info = self.env.step(1)
            if terminated or truncated:
                obs, info = self.env.reset(**kwargs)
        return obs, info

    def step(self, action):
        lives = self.env.unwrapped.ale.lives()
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.needs_fire and info["lives"] < lives and not (terminated or truncated):
            obs, more, terminated, truncated, info = self.env.step(1)
            reward += more
        return obs, reward, terminated, truncated, info


def make_env(env_id: str, idx: int, video_dir: Optional[str], sticky_actions: Optional[float] = None):
    def thunk():
        # Frame skipping is done by AtariPreprocessing (with a max over the last two frames), so the
        # emulator itself must not skip; v5 ids skip 4 frames by default.
        kwargs = {"frameskip": 1}
        if sticky_actions is not None:
            kwargs["repeat_action_probability"] = sticky_actions
        if video_dir is not None and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array", **kwargs)
            env = gym.wrappers.RecordVideo(env, video_dir, disable_logger=True)
        else:
            env = gym.make(env_id, **kwargs)
        # Up to 30 no-ops at reset, skip 4 frames with a max over the last two, 84x84 grayscale.
        # Life loss is handled in the training loop, so the emulator is reset only on game over.
        env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84,
                                              terminal_on_life_loss=False, grayscale_obs=True)
        env = FireOnReset(env)
        return gym.wrappers.FrameStackObservation(env, 4)

    return thunk


def make_envs(env_id: str, num_envs: int, video_dir: Optional[str] = None,
              sticky_actions: Optional[float] = None) -> gym.vector.VectorEnv:
    """Vector env with episode statistics of the real game score and rewards clipped to their sign.

    Every gymnasium 1.x vector env autoresets on the NEXT step: the step after an episode ends returns
    the first observation of the next episode with reward 0 and ignores the action. The training loop
    marks those steps as not-a-transition (`valid`) and never trains on them; the observation returned
    when an episode ends is then the true final observation, which is what truncation needs.
    """
    envs = gym.vector.SyncVectorEnv([make_env(env_id, i, video_dir, sticky_actions) for i in range(num_envs)])
    # Statistics before clipping: the reported return is the game score over all lives, unclipped.
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    # Learning sees only the reward's sign, so one set of hyperparameters fits every game (detail 5).
    return gym.wrappers.vector.TransformReward(envs, np.sign)


def check_spaces(env_id: str, envs: gym.vector.VectorEnv) -> None:
    act, obs = envs.single_action_space, envs.single_observation_space
    if not isinstance(act, gym.spaces.Discrete):
        raise UsageError(f"--env-id {env_id} has a {type(act).__name__} action space; this script needs Discrete actions")
    if not isinstance(obs, gym.spaces.Box) or obs.shape != (4, 84, 84):
        raise UsageError(f"--env-id {env_id} gives observations {obs} after preprocessing, not 4 stacked 84x84 frames")


def env_state(envs: gym.vector.VectorEnv) -> Optional[bytes]:
    """Everything needed to continue the envs exactly, or None if they cannot be saved.

    The vector env and its wrappers (frame stacks included) pickle as they are. ALE envs pickle only
    their constructor arguments, so each emulator's state (with its random generator, which drives
    sticky actions) and the env's own generator (which draws the no-ops) are saved beside them.
    """
    emulators = [(env.unwrapped.ale.cloneState(include_rng=True), env.unwrapped.np_random) for env in envs.unwrapped.envs]
    try:
        return cloudpickle.dumps((envs, emulators))
    except Exception:  # envs that hold unpicklable handles resume with fresh episodes instead
        return None


def restore_env_state(blob: bytes) -> gym.vector.VectorEnv:
    envs, emulators = pickle.loads(blob)
    for env, (state, rng) in zip(envs.unwrapped.envs, emulators):
        env.unwrapped.ale.restoreState(state)
        env.unwrapped.np_random = rng
    return envs


# ----------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------
def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    # Orthogonal init, gain sqrt(2) for hidden layers (implementation detail 2).
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """The Nature DQN CNN (Mnih et al. 2015), shared by the actor and critic heads."""

    def __init__(self, n_actions: int):
        super().__init__()
        self.network = nn.Sequential(
            layer_init(nn.Conv2d(4, 32, 8, stride=4)), nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(),
            nn.Flatten(),
            layer_init(nn.Linear(64 * 7 * 7, 512)), nn.ReLU(),
        )
        # A 0.01 gain makes the first policy nearly uniform over actions, so early exploration is broad.
        self.actor = layer_init(nn.Linear(512, n_actions), std=0.01)
        self.critic = layer_init(nn.Linear(512, 1), std=1.0)
        # Channels-last weights (and frames) let oneDNN use its fastest CPU convolutions: about 1.4x here.
        self.to(memory_format=torch.channels_last)

    def hidden(self, obs: torch.Tensor) -> torch.Tensor:
        # uint8 frames in, [0, 1] floats to the network (detail 9).
        return self.network(obs.contiguous(memory_format=torch.channels_last) / 255.0)

    def heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy logits and value, always in fp32. Under --bf16 only the trunk runs in bfloat16: its 8-bit
        mantissa would bias the sampling noise and round values more coarsely than the value clip range."""
        with torch.autocast(hidden.device.type, enabled=False):
            hidden = hidden.float()
            return self.actor(hidden), self.critic(hidden).squeeze(-1)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.heads(self.hidden(obs))[1]

    def act(self, obs: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        """Sample actions (evaluation's forward pass; the rollout uses act_with_value)."""
        logits, _ = self.heads(self.hidden(obs))
        if greedy:
            return logits.argmax(-1)
        # Gumbel-max trick: argmax(logits + Gumbel noise) is an exact sample of softmax(logits), and
        # -log(Exp(1)) is Gumbel noise. Much cheaper than building a Categorical every step.
        return (logits - torch.empty_like(logits).exponential_().log()).argmax(-1)

    def act_with_value(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample actions with their log-probs and values. The trunk is shared, so the rollout gets
        these from its one forward pass for the price of two small heads (the MLP scripts, whose
        critic is a network of its own, compute them after the rollout in one batch instead)."""
        logits, value = self.heads(self.hidden(obs))
        action = (logits - torch.empty_like(logits).exponential_().log()).argmax(-1)
        logp = F.log_softmax(logits, -1).gather(-1, action.unsqueeze(-1)).squeeze(-1)
        return action, logp, value

    def evaluate(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probability of the taken actions, policy entropy and value under the current parameters."""
        logits, value = self.heads(self.hidden(obs))
        logp_all = F.log_softmax(logits, -1)
        logp = logp_all.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy, value


# ----------------------------------------------------------------------------------------------------
# Generalized Advantage Estimation
# ----------------------------------------------------------------------------------------------------
def compute_gae(rewards: torch.Tensor, values: torch.Tensor, terminations: torch.Tensor, dones: torch.Tensor,
                gamma: float, gae_lambda: float) -> torch.Tensor:
    """GAE (Schulman et al. 2016, arXiv:1506.02438) over a rollout of T steps of N envs.

    rewards, terminations, dones: (T, N), the outcome of the action taken at step t; dones is
        terminated OR truncated, both as 0/1 floats.
    values: (T + 1, N), V(obs_t) for every observation of the rollout including the one after the last
        step. When an episode ends at step t, obs_{t+1} is its true final observation.

    Truncation is not termination: a time-limit cut bootstraps from V(final observation), and only a
    real terminal state is worth 0. Either way the advantage recursion stops at the episode's end.
    The result carries no gradient: advantages are targets, not functions of the critic's parameters.
    """
    with torch.no_grad():
        deltas = rewards + gamma * values[1:] * (1.0 - terminations) - values[:-1]
        discounts = gamma * gae_lambda * (1.0 - dones)
        advantages, next_advantage = [], torch.zeros_like(deltas[0])
        for delta, discount in zip(deltas.flip(0), discounts.flip(0)):  # backwards in time
            next_advantage = delta + discount * next_advantage
            advantages.append(next_advantage)
    return torch.stack(advantages[::-1])


# ----------------------------------------------------------------------------------------------------
# PPO loss
# ----------------------------------------------------------------------------------------------------
def ppo_loss(newlogp: torch.Tensor, oldlogp: torch.Tensor, advantages: torch.Tensor,
             newvalue: torch.Tensor, oldvalue: torch.Tensor, returns: torch.Tensor, entropy: torch.Tensor,
             clip_coef: float, vf_coef: float, ent_coef: float, norm_adv: bool = True, clip_vloss: bool = True,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + value loss - entropy bonus for one minibatch; returns (loss, its parts)."""
    advantages = advantages.detach()  # a target: no gradient may flow into whatever produced it
    if norm_adv:
        # Per-minibatch normalization keeps the advantage scale fixed, so one clip_coef fits every task.
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

    # Importance sampling: the batch was drawn from the old policy, ratio = pi_new / pi_old.
    logratio = newlogp - oldlogp
    ratio = logratio.exp()
    # The pessimistic minimum gives zero gradient once the ratio leaves [1 - eps, 1 + eps] in the
    # direction the advantage favours: no incentive to move the policy further from the old one.
    pg_loss = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)).mean()

    if clip_vloss:
        # Value clipping (implementation detail 9): the critic moves at most clip_coef from its old value.
        v_clipped = oldvalue + torch.clamp(newvalue - oldvalue, -clip_coef, clip_coef)
        v_loss = 0.5 * torch.max((newvalue - returns) ** 2, (v_clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((newvalue - returns) ** 2).mean()

    entropy_loss = entropy.mean()
    loss = pg_loss - ent_coef * entropy_loss + vf_coef * v_loss

    stats = {"policy_loss": pg_loss.detach(), "value_loss": v_loss.detach(), "entropy": entropy_loss.detach(),
             "logratio": logratio.detach()}
    return loss, stats


def policy_shift(logratio: torch.Tensor, clip_coef: float) -> dict[str, torch.Tensor]:
    """How far the new policy moved from the one that collected the batch, from log(pi_new / pi_old)."""
    with torch.no_grad():
        w = logratio.exp()
        return {
            # KL(old || new) estimators, http://joschu.net/blog/kl-approx.html: the naive -log r and the
            # unbiased, always non-negative (r - 1) - log r.
            "old_approx_kl": (-logratio).mean(),
            "approx_kl": ((w - 1) - logratio).mean(),
            "clipfrac": ((w - 1.0).abs() > clip_coef).float().mean(),
            # Effective sample size of the importance weights as a fraction of the batch: 1 while
            # new == old, falling toward 0 as a few samples dominate the gradient estimate.
            "ess": w.sum() ** 2 / (w.numel() * (w**2).sum()),
        }


# ----------------------------------------------------------------------------------------------------
# Data-parallel training (torchrun)
# ----------------------------------------------------------------------------------------------------
# `torchrun --nproc-per-node N <script> ...` starts N copies of the script, the ranks. Each steps its own
# envs and computes the loss on its own batch; every minibatch the ranks average their gradients, so
# all take the same Adam step and hold identical parameters: one agent learning from N times the data.
# A plain `python <script>` run is rank 0 of 1, and none of these functions communicates.
def init_distributed(use_cuda: bool) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the other ranks when started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = use_cuda and torch.cuda.is_available()
    if world_size == 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda and local_rank >= torch.cuda.device_count():
        raise UsageError(f"this node runs more ranks than its {torch.cuda.device_count()} GPU(s); use "
                         f"--nproc-per-node {torch.cuda.device_count()}, or --no-cuda to train on the CPUs")
    # One GPU per rank, talking over NCCL; CPU ranks talk over Gloo.
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), world_size, device


def all_sum(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """x summed over all ranks (x itself in a single-process run)."""
    if world_size > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def average_gradients(params: list[torch.Tensor], world_size: int) -> None:
    """Replace every rank's gradients by their mean over the ranks, in one flat all-reduce.

    DistributedDataParallel does the same from hooks inside backward(); written out, the update stays
    readable and works with agent.evaluate, which is not the module's forward().
    """
    if world_size == 1:
        return
    grads = [p.grad for p in params]
    mean = all_sum(torch.cat([g.flatten() for g in grads]), world_size) / world_size
    for g, m in zip(grads, mean.split([g.numel() for g in grads])):
        g.copy_(m.view_as(g))


def normalize_across_ranks(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Zero mean and unit std over the union of all ranks' minibatches.

    Per-minibatch advantage normalization of a data-parallel run: the global minibatch is the union of
    the ranks' minibatches, so its mean and std come from sums over all ranks.
    """
    s = all_sum(torch.stack([x.new_tensor(x.numel()), x.sum(), (x**2).sum()]).double(), world_size)
    n, mean = s[0], s[1] / s[0]
    std = ((s[2] - n * mean**2) / (n - 1)).clamp_min(0).sqrt()  # unbiased, as torch.std
    return ((x - mean) / (std + 1e-8)).to(x.dtype)


def explained_variance(y_pred: torch.Tensor, y_true: torch.Tensor, world_size: int) -> tuple[float, bool]:
    """1 - Var(returns - values) / Var(returns) over all ranks' batches, and whether the returns vary.

    Explained variance says little when returns barely vary (e.g. every episode hits the time limit):
    the second value is False then.
    """
    y, e = y_true.double(), (y_true - y_pred).double()
    s = all_sum(torch.stack([y.new_tensor(y.numel()), y.sum(), (y**2).sum(), e.sum(), (e**2).sum(), y.abs().sum()]),
                world_size).tolist()
    n = s[0]
    var_y, var_e = (s[2] - s[1] ** 2 / n) / max(n - 1, 1), (s[4] - s[3] ** 2 / n) / max(n - 1, 1)
    ev = 1 - var_e / var_y if var_y > 0 else float("nan")
    return ev, var_y > 0 and var_y**0.5 > 0.05 * s[5] / n


# ----------------------------------------------------------------------------------------------------
# Saving, loading, logging
# ----------------------------------------------------------------------------------------------------
def save_atomic(obj: dict, path: str) -> None:
    """Write then rename: a crash mid-write never leaves a half-written file in place of the last good one."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_file(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} does not exist; pass a file such as runs/<run_name>/checkpoint.pt or agent.pt")
    try:
        # weights_only=False: a checkpoint holds pickled env and RNG state. Load only files you trust.
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UsageError(f"{what} {path} cannot be read ({type(e).__name__}); it is corrupt or not a file written by this script") from None
    if not isinstance(data, dict) or "script" not in data or "model" not in data:
        raise UsageError(f"{what} {path} is not a file written by {SCRIPT}.py")
    if data["script"] != SCRIPT:
        raise UsageError(f"{what} {path} was written by {data['script']}.py; load it with that script")
    return data


def write_results(run_dir: str, args: Args, episodes: dict, global_step: int, elapsed: float) -> None:
    """Every finished episode to episodes.csv and the run's totals to summary.json, in the run folder.

    Plain files that the benchmark suite (or a spreadsheet) reads without TensorBoard.
    """
    with open(os.path.join(run_dir, "episodes.csv"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["global_step", "time_s", "return", "length"])
        out.writerows(zip(episodes["steps"], (round(t, 3) for t in episodes["times"]), episodes["returns"], episodes["lengths"]))
    summary = {"script": SCRIPT, "env_id": args.env_id, "seed": args.seed, "global_step": global_step,
               "total_timesteps": args.total_timesteps,
               "finished": global_step >= args.num_iterations * args.batch_size * args.world_size,  # every update done
               "time_s": round(elapsed, 3), "sps": round(global_step / max(elapsed, 1e-9), 1), "episodes": len(episodes["returns"]),
               "final_return": float(np.mean(episodes["returns"][-100:])) if episodes["returns"] else None}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


class Logger:
    """TensorBoard (and optionally wandb) scalars, buffered.

    TensorBoard's writer thread competes with training for the interpreter lock; handing it scalars in
    bursts every few dozen updates instead of one at a time makes a fast run about 30% faster.
    """

    def __init__(self, run_dir: str, args: Args, every: int = 50):
        self.buffer: list[tuple[str, float, int]] = []
        self.every = every
        self.wandb = None
        if args.track:
            import wandb

            # Patching TensorBoard to this run's own folder keeps metric names unprefixed and avoids the
            # 10-second wait at exit that sync_tensorboard alone causes.
            wandb.tensorboard.patch(root_logdir=run_dir)
            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                                    config=asdict(args), name=os.path.basename(run_dir), save_code=True)
        self.writer = SummaryWriter(run_dir)
        table = "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
        self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.buffer.extend((k, v, step) for k, v in metrics.items())
        if len(self.buffer) >= self.every * len(metrics):
            self.flush()

    def flush(self) -> None:
        for tag, value, step in self.buffer:
            self.writer.add_scalar(tag, value, step)
        self.buffer.clear()
        self.writer.flush()

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


class Progress:
    """A live bar in a terminal; otherwise a plain line every 5% of training."""

    def __init__(self, enabled: bool, total: int, start: int):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.total, self.start, self.bar, self.next_line = total, start, None, 0
        self.enabled = enabled
        if enabled and self.console.is_terminal:
            from rich import progress as rp

            self.bar = rp.Progress(
                rp.TextColumn("[bold]{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                rp.TextColumn("{task.fields[info]}"), rp.TimeRemainingColumn(), console=self.console,
                refresh_per_second=4,
            )
            self.task = self.bar.add_task("steps", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, sps: float, ret: float) -> None:
        info = f"{sps:,.0f} steps/s  return {ret:.1f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif self.enabled and step >= self.next_line:
            eta = (self.total - step) / max(sps, 1e-9)
            self.console.print(f"step {step:,}/{self.total:,} ({100 * step / self.total:.0f}%)  {info}  ETA {eta:.0f}s",
                               highlight=False, soft_wrap=True)
            self.next_line = step + max(self.total // 20, 1)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class Health:
    """Watches the instability signals of PPO and prints one warning line per kind of trouble."""

    def __init__(self, progress: Progress, target_kl: Optional[float]):
        self.progress, self.seen, self.recent_ev = progress, set(), []
        # "Far above target": twice the target, or 0.05 when no target is set (typical values are ~0.01).
        self.kl_limit = 2 * target_kl if target_kl is not None else 0.05

    def check(self, m: dict[str, float], step: int, late: bool, returns_vary: bool = True) -> None:
        if m["losses/approx_kl"] > self.kl_limit:
            self.warn("kl", f"approx KL {m['losses/approx_kl']:.3f} > {self.kl_limit:.3f} at step {step}: the policy moves "
                      "far per update; lower --learning-rate or --update-epochs, or set --target-kl")
        # Explained variance is noisy from one batch to the next: judge its mean over the last 20 updates.
        self.recent_ev = (self.recent_ev + [m["losses/explained_variance"] if returns_vary else float("nan")])[-20:]
        ev = float(np.nanmean(self.recent_ev)) if np.isfinite(self.recent_ev).sum() >= 10 else 0.0
        if late and ev < 0:
            self.warn("ev", f"explained variance averaged {ev:.2f} < 0 over the last 20 updates at step {step}: the "
                      "critic predicts returns worse than their mean, so advantages are mostly noise")
        if m["losses/ess"] < 0.5:
            self.warn("ess", f"effective sample size fell to {m['losses/ess']:.2f} of the minibatch at step {step}: a few "
                      "samples dominate the gradient; lower --learning-rate or --clip-coef")

    def warn(self, kind: str, message: str) -> None:
        if kind not in self.seen:
            self.seen.add(kind)
            self.progress.warn(message + " (shown once)")


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
def train(args: Args, stop_at_step: Optional[int] = None) -> dict:
    """Train PPO; returns the agent, run folder and the episodes seen ({"returns", "lengths", "steps", "times"}).

    stop_at_step ends training early at that global step while the learning-rate schedule still runs
    over args.total_timesteps (to look at the first part of a full-length run).
    """
    check_args(args)
    ckpt = load_file(args.resume, "checkpoint") if args.resume else None
    if ckpt is not None:
        if "optimizer" not in ckpt:
            raise UsageError(f"--resume {args.resume} is a saved agent, not a checkpoint; resume from runs/<run_name>/checkpoint.pt")
        for name in ("env_id", "num_envs"):
            if ckpt["args"][name] != getattr(args, name):
                raise UsageError(f"--resume {args.resume} was trained with --{name.replace('_', '-')} {ckpt['args'][name]}, "
                                 f"not {getattr(args, name)}; drop the option to continue as it was")
        if len(ckpt["ranks"]) != args.world_size:
            raise UsageError(f"--resume {args.resume} was written by a run of {len(ckpt['ranks'])} process(es), not "
                             f"{args.world_size}; resume it with as many (torchrun --nproc-per-node, or plain python for 1)")
        args.run_name = ckpt["args"]["run_name"]
    run_name = args.run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    args.run_name = run_name.replace("/", "-")

    if args.cuda and not torch.cuda.is_available():
        print("note: no CUDA GPU is available; running on the CPU (--no-cuda silences this)", file=sys.stderr)
    rank, world_size, device = init_distributed(args.cuda)
    main_rank = rank == 0  # the one that logs, shows progress and writes files
    if world_size > 1:
        names = [args.run_name]
        dist.broadcast_object_list(names, src=0)  # rank 0's clock names the run
        args.run_name = names[0]
    run_dir = os.path.join("runs", args.run_name)

    # Each rank its own random streams; rank 0 (and a single-process run) uses --seed itself.
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    video_dir = os.path.join("videos", args.run_name) if args.capture_video and main_rank else None
    envs = make_envs(args.env_id, args.num_envs, video_dir, args.sticky_actions)
    check_spaces(args.env_id, envs)
    obs_shape = envs.single_observation_space.shape
    n_actions = int(envs.single_action_space.n)

    agent = Agent(n_actions).to(device)
    # Listed once: walking the module tree costs about 0.1 ms, paid twice per minibatch otherwise.
    params = list(agent.parameters())
    if world_size > 1:
        for p in params:
            dist.broadcast(p.data, src=0)  # every rank starts from rank 0's initialization
    # Adam eps 1e-5 (detail 3) instead of torch's 1e-8; the fused kernel does the whole step in one call.
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5, fused=True)

    # Rollout storage. obs has T + 1 rows: the observation after the last step is needed for bootstrapping.
    T, N = args.num_steps, args.num_envs
    # Frames stay uint8 (1 byte per pixel) in the buffer; the network scales them when it reads them.
    obs = torch.zeros((T + 1, N, *obs_shape), dtype=torch.uint8, device=device)
    actions = torch.zeros((T, N), dtype=torch.long, device=device)
    logprobs = torch.zeros((T, N), device=device)
    values = torch.zeros((T + 1, N), device=device)
    # Env outputs stay in numpy during the rollout; they become tensors once per rollout, not once per step.
    rewards = np.zeros((T, N), dtype=np.float32)
    terminations = np.zeros((T, N), dtype=np.float32)
    dones = np.zeros((T, N), dtype=np.float32)
    valid = np.zeros((T, N), dtype=bool)

    episodes = {"returns": [], "lengths": [], "steps": [], "times": []}
    global_step, start_iteration, elapsed_before = 0, 1, 0.0
    if ckpt is not None:
        try:
            agent.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(f"--resume {args.resume} does not fit this network ({str(e).splitlines()[0]})") from None
        mine = ckpt["ranks"][rank]
        if mine["envs"] is not None:
            envs.close()
            envs = restore_env_state(mine["envs"])
            next_obs, next_valid = mine["next_obs"], mine["next_valid"]
        else:  # the envs could not be saved: new episodes, seeded apart from those of the first start
            next_obs, _ = envs.reset(seed=args.seed + rank * N + ckpt["global_step"])
            next_valid = np.ones(N, dtype=bool)
        torch.set_rng_state(mine["rng"]["torch"])
        np.random.set_state(mine["rng"]["numpy"])
        random.setstate(mine["rng"]["python"])
        if device.type == "cuda" and mine["rng"]["cuda"] is not None:  # the sampling noise and shuffles on the GPU
            torch.cuda.set_rng_state(mine["rng"]["cuda"], device)
        global_step, start_iteration = ckpt["global_step"], ckpt["iteration"] + 1
        episodes, elapsed_before = ckpt["episodes"], ckpt["elapsed"]
    else:
        # No two envs of the job share a seed: rank r's env i is seeded like env r * num_envs + i of one big run.
        next_obs, _ = envs.reset(seed=args.seed + rank * N)
        next_valid = np.ones(N, dtype=bool)
    lives = np.array([env.unwrapped.ale.lives() for env in envs.unwrapped.envs])
    obs[T] = torch.as_tensor(next_obs, device=device)

    def checkpoint(iteration: int) -> Optional[str]:
        # Parameters and optimizer are the same on every rank; envs and random streams are each rank's own.
        mine = {"envs": env_state(envs), "next_obs": obs[T].cpu().numpy(), "next_valid": next_valid.copy(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
        ranks = [mine]
        if world_size > 1:
            ranks = [None] * world_size if main_rank else None
            dist.gather_object(mine, ranks, dst=0)
        if not main_rank:
            return None
        path = os.path.join(run_dir, "checkpoint.pt")
        save_atomic({
            "script": SCRIPT, "args": asdict(args), "iteration": iteration, "global_step": global_step,
            "model": agent.state_dict(), "optimizer": optimizer.state_dict(), "ranks": ranks,
            "episodes": episodes, "elapsed": elapsed_before + time.time() - start_time,
        }, path)
        return path

    if main_rank:
        os.makedirs(run_dir, exist_ok=True)
        logger = Logger(run_dir, args)
    progress = Progress(args.progress and main_rank, args.total_timesteps, global_step)
    health = Health(progress, args.target_kl)

    # Ctrl-C finishes the current update, writes a checkpoint and stops; a second Ctrl-C quits at once.
    stop_requested = []

    def on_sigint(signum, frame):
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested.append(True)
        if main_rank:
            progress.warn("Ctrl-C: finishing this update, then writing a checkpoint (Ctrl-C again quits at once)")

    previous_handler = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    start_time, start_step = time.time(), global_step
    interrupted = False
    try:
        for iteration in range(start_iteration, args.num_iterations + 1):
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (iteration - 1.0) / args.num_iterations)

            # --- rollout: the actor alone, no autograd bookkeeping ---
            obs[0] = obs[T]
            seen = len(episodes["returns"])
            with torch.inference_mode():
                for step in range(T):
                    valid[step] = next_valid
                    with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                        action, logprobs[step], values[step] = agent.act_with_value(obs[step])
                    actions[step] = action
                    # On the CPU .cpu() is free; with a GPU this is the one unavoidable copy per step.
                    next_obs, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
                    # Losing a life ends the episode for learning (no value flows across it), but not for the
                    # emulator, which plays on, nor for the reported score (detail 3 for Atari).
                    life_lost = info["lives"] < lives
                    lives = info["lives"]
                    rewards[step], terminations[step] = reward, terminated | life_lost
                    done = np.logical_or(terminated, truncated)
                    dones[step] = done | life_lost
                    # The step after an episode ends only resets that env: not a transition to learn from.
                    next_valid = ~done
                    obs[step + 1] = torch.as_tensor(next_obs, device=device)
                    if "_episode" in info:
                        ended = info["_episode"]
                        n_ended = int(ended.sum())
                        episodes["returns"].extend(info["episode"]["r"][ended].tolist())
                        episodes["lengths"].extend(info["episode"]["l"][ended].tolist())
                        episodes["steps"].extend([global_step + (step + 1) * N * world_size] * n_ended)
                        episodes["times"].extend([elapsed_before + time.time() - start_time] * n_ended)
            global_step += T * N * world_size
            if world_size > 1:  # rank 0 logs the episodes of every rank
                everyone = [None] * world_size if main_rank else None
                dist.gather_object({k: v[seen:] for k, v in episodes.items()}, everyone, dst=0)
                for other in everyone[1:] if main_rank else []:
                    for k, v in other.items():
                        episodes[k].extend(v)

            # --- advantages (log-probs and values came with the rollout's forward passes) ---
            b_obs, b_actions = obs[:-1].flatten(0, 1), actions.flatten(0, 1)
            with torch.no_grad():
                b_logprobs, b_values = logprobs.flatten(), values[:-1].flatten()
                with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                    values[T] = agent.get_value(obs[T])
                advantages = compute_gae(torch.from_numpy(rewards).to(device), values,
                                         torch.from_numpy(terminations).to(device), torch.from_numpy(dones).to(device),
                                         args.gamma, args.gae_lambda)
                b_advantages = advantages.reshape(-1)
                b_returns = b_advantages + b_values
            b_inds = torch.from_numpy(valid.reshape(-1)).to(device).nonzero().squeeze(1)
            if len(b_inds) < 2 * args.num_minibatches:  # a minibatch of one has no advantage std to normalize by
                raise UsageError(f"this rollout holds only {len(b_inds)} transitions to learn from (the other steps only reset "
                                 f"an env after its episode ended), too few for --num-minibatches {args.num_minibatches}; "
                                 f"use fewer minibatches or a larger --num-steps")

            # --- K epochs of minibatch Adam on the batch ---
            mb_stats = []
            for epoch in range(args.update_epochs):
                perm = b_inds[torch.randperm(len(b_inds), device=device)]
                logratios = []
                for mb in torch.tensor_split(perm, args.num_minibatches):
                    with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                        newlogp, entropy, newvalue = agent.evaluate(b_obs[mb], b_actions[mb])
                    mb_advantages = b_advantages[mb]
                    if world_size > 1 and args.norm_adv:  # normalize over the global minibatch, not this rank's part
                        mb_advantages = normalize_across_ranks(mb_advantages, world_size)
                    loss, stats = ppo_loss(newlogp, b_logprobs[mb], mb_advantages, newvalue, b_values[mb],
                                           b_returns[mb], entropy, clip_coef=args.clip_coef, vf_coef=args.vf_coef,
                                           ent_coef=args.ent_coef, norm_adv=args.norm_adv and world_size == 1,
                                           clip_vloss=args.clip_vloss)
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(
                            f"the loss became {loss.item()} at step {global_step} (update {iteration}); training stopped "
                            f"before applying it. Lower --learning-rate or --max-grad-norm; the last checkpoint (if any) "
                            f"is kept in {run_dir}")
                    optimizer.zero_grad()
                    loss.backward()
                    average_gradients(params, world_size)
                    grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    logratios.append(stats.pop("logratio"))
                    mb_stats.append(torch.stack([*stats.values(), grad_norm]))
                shift = policy_shift(torch.cat(logratios), args.clip_coef)
                # Averaged over the ranks, so that every rank takes the same early-stop decision.
                shift = dict(zip(shift, all_sum(torch.stack(list(shift.values())), world_size) / world_size))
                if args.target_kl is not None and shift["approx_kl"] > args.target_kl:
                    break  # early stop (detail 12): the policy already moved as far as we allow

            # --- diagnostics, over all ranks: one host sync per update ---
            with torch.no_grad():
                explained_var, returns_vary = explained_variance(b_values[b_inds], b_returns[b_inds], world_size)
                # Losses are averaged over all minibatches; the policy's shift is measured over the last epoch.
                means = (all_sum(torch.stack(mb_stats).mean(0), world_size) / world_size).tolist()
            m = {f"losses/{k}": v for k, v in zip([*stats.keys(), "grad_norm"], means)}
            m.update({f"losses/{k}": v.item() for k, v in shift.items()})
            m["losses/explained_variance"] = explained_var
            m["losses/epochs"] = epoch + 1
            elapsed = time.time() - start_time
            sps = (global_step - start_step) / elapsed
            m["charts/learning_rate"] = optimizer.param_groups[0]["lr"]
            m["charts/SPS"] = sps
            recent = episodes["returns"][-20:]
            if recent:
                m["charts/episodic_return"] = float(np.mean(recent))
                m["charts/episodic_length"] = float(np.mean(episodes["lengths"][-20:]))
            if main_rank:
                logger.log(m, global_step)
                health.check(m, global_step, late=iteration > args.num_iterations // 2, returns_vary=returns_vary)
                progress.update(global_step, sps, m.get("charts/episodic_return", float("nan")))

            stop = bool(stop_requested)
            if world_size > 1:  # Ctrl-C reaches the ranks at slightly different moments: all stop together
                stop = all_sum(torch.tensor(float(stop), device=device), world_size).item() > 0
            if args.checkpoint_every and iteration % args.checkpoint_every == 0:
                checkpoint(iteration)
            if stop:
                path = checkpoint(iteration)
                if main_rank:
                    progress.warn(f"stopped at step {global_step}; checkpoint written to {path}; continue with --resume {path}")
                interrupted = True
                break
            if stop_at_step is not None and global_step >= stop_at_step:
                break
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        progress.close()
        envs.close()
        if main_rank:
            logger.close()
            write_results(run_dir, args, episodes, global_step, elapsed_before + time.time() - start_time)
        if world_size > 1:
            dist.destroy_process_group()

    if args.save_model and not interrupted and main_rank:
        path = os.path.join(run_dir, "agent.pt")
        save_atomic({"script": SCRIPT, "args": asdict(args), "model": agent.state_dict(), "n_actions": n_actions}, path)
        print(f"saved agent to {path}", file=sys.stderr)
    return {"agent": agent, "run_dir": run_dir, "episodes": episodes, "global_step": global_step,
            "interrupted": interrupted}


# ----------------------------------------------------------------------------------------------------
# Evaluation of a saved agent
# ----------------------------------------------------------------------------------------------------
def evaluate(path: str, episodes: int, seed: int = 0, video_dir: Optional[str] = None) -> np.ndarray:
    """Play `episodes` episodes with a saved agent (or a checkpoint); returns their undiscounted returns."""
    data = load_file(path, "--eval-checkpoint")
    env_id = data["args"]["env_id"]
    envs = make_envs(env_id, 1, video_dir, data["args"]["sticky_actions"])
    check_spaces(env_id, envs)
    agent = Agent(int(envs.single_action_space.n))
    try:
        agent.load_state_dict(data["model"])
    except RuntimeError as e:
        raise UsageError(f"--eval-checkpoint {path} does not fit this network ({str(e).splitlines()[0]})") from None
    torch.manual_seed(seed)
    returns = []
    next_obs, _ = envs.reset(seed=seed)
    with torch.inference_mode():
        while len(returns) < episodes:
            action = agent.act(torch.as_tensor(next_obs))
            next_obs, _, _, _, info = envs.step(action.numpy())
            if "_episode" in info:
                returns.extend(info["episode"]["r"][info["_episode"]].tolist())
    envs.close()
    return np.array(returns[:episodes])


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        # With --resume, the checkpoint's options are the defaults: only what is given again changes.
        default = None
        resume = next((a.split("=", 1)[1] for a in argv if a.startswith("--resume=")), None)
        if "--resume" in argv and argv.index("--resume") + 1 < len(argv):
            resume = argv[argv.index("--resume") + 1]
        if resume:
            saved = load_file(resume, "checkpoint")["args"]
            default = Args(**{k: v for k, v in saved.items() if k in Args.__dataclass_fields__})
        args = tyro.cli(Args, args=argv, default=default, description=__doc__.split("\n")[0])
        if args.eval_checkpoint:
            if args.world_size > 1:
                raise UsageError("--eval-checkpoint plays in one process; run it with python, not torchrun")
            if args.eval_episodes <= 0:
                raise UsageError(f"--eval-episodes is {args.eval_episodes}; it must be a positive integer")
            video_dir = os.path.join("videos", "eval-" + os.path.basename(os.path.dirname(os.path.abspath(args.eval_checkpoint)))) \
                if args.capture_video else None
            returns = evaluate(args.eval_checkpoint, args.eval_episodes, args.seed, video_dir)
            print(f"{len(returns)} episodes: return {returns.mean():.2f} +- {returns.std():.2f} "
                  f"(min {returns.min():.1f}, max {returns.max():.1f})")
            return 0
        result = train(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
