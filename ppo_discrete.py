"""PPO for discrete actions and vector observations (classic control), in one file.

    python ppo_discrete.py                          # CartPole-v1, 500k steps, logs in runs/
    python ppo_discrete.py --env-id Acrobot-v1 --seed 2 --save-model
    python ppo_discrete.py --eval-checkpoint runs/<run>/agent.pt --eval-episodes 10
    python ppo_discrete.py --help                   # every option

Part A, from the top, is PPO: the options (Args), the environments, the network (Agent), GAE (compute_gae), the
loss (ppo_loss) and the training loop (train). Part B, below its banner, runs the experiment around it.
Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347); the implementation
details follow Huang et al. 2022, "The 37 Implementation Details of PPO" (ICLR blog track).
"""

import contextlib
import dataclasses
import fcntl
import functools
import importlib
import io
import json
import math
import multiprocessing
import os
import pickle
import random
import secrets
import shutil
import signal
import sys
import threading
import time
import traceback
import typing
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import cloudpickle  # comes with gymnasium; pickles the vector env (with its env factories) for exact resume
import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = os.path.basename(__file__).removesuffix(".py")
    """name of the experiment, part of the run name (default: this file's name)"""
    seed: int = 1
    """random seed; env i is seeded with seed + i (under torchrun rank r: seed + r, its envs seed + r * num_envs + i)"""
    run_name: Optional[str] = None
    """folder name under runs/ and videos/, a new one (default: <env_id>__<exp_name>__<seed>__<unix time>_<random>)"""
    torch_deterministic: bool = True
    """ask torch for deterministic kernels (the same seed then gives the same numbers)"""
    cuda: bool = False
    """run the network on a CUDA GPU if there is one (small MLPs are usually faster on the CPU)"""
    torch_threads: int = 1
    """CPU threads for torch (0: all cores); one is fastest for small networks and leaves a core to the envs"""
    compile: bool = False
    """compile the forward passes and the loss with torch.compile (the first update pays for it, and says so)"""
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
    """write runs/<run_name>/checkpoint.pt every this many updates (0: off; Ctrl-C and SIGTERM always write one)"""
    checkpoint_minutes: float = 10.0
    """also write it when this many minutes passed since the last one (0: off): a killed run loses at most that"""
    resume: Optional[str] = None
    """continue training from this checkpoint; its options are the defaults. It holds the envs pickled, and resuming
    runs code from it: resume only your own runs (share agent.pt, which loads without running any)"""
    eval_checkpoint: Optional[str] = None
    """evaluate this saved agent or checkpoint instead of training, then exit"""
    eval_episodes: int = 10
    """episodes to play with --eval-checkpoint"""
    eval_seed: Optional[int] = None
    """env seed of the evaluation (default: 1,000,000,000 + the training seed, apart from every training env's)"""
    eval_deterministic: bool = False
    """evaluate with the most likely action (argmax) instead of actions sampled from the policy"""

    # --- algorithm ---
    env_id: str = "CartPole-v1"
    """gymnasium id of an env with discrete actions (Discrete, MultiDiscrete, MultiBinary) and observations that
    flatten to a vector (module:Env-v0 imports module first)"""
    action_masks: bool = True
    """give invalid actions zero probability when the env reports which are valid (info or observation "action_mask")"""
    total_timesteps: int = 500_000
    """environment steps to train for, summed over all envs (and all ranks under torchrun)"""
    learning_rate: float = 2.5e-4
    """Adam step size at the start of training"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over training"""
    num_envs: int = 4
    """parallel environments per process (under torchrun each rank runs this many)"""
    async_envs: bool = False
    """step each env in a process of its own (gymnasium's AsyncVectorEnv): pays for slow envs, with cores to spare"""
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
    clip_coef: float = 0.2
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
    lstm: bool = False
    """put an LSTM between the observations and each head (a recurrent policy, for partially observed envs): the
    actor's and the critic's own; rewards are scaled (divided by the running std of the discounted return)"""
    lstm_hidden_size: int = 128
    """units of each LSTM (with --lstm)"""

    # --- sizes derived from the options above, in one place ---
    @property
    def world_size(self) -> int:  # processes training together: torchrun sets WORLD_SIZE; a plain run is 1
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def batch_size(self) -> int:  # per process; under torchrun an update learns from world_size times as many
        return self.num_envs * self.num_steps

    @property
    def num_iterations(self) -> int:
        return self.total_timesteps // (self.batch_size * self.world_size)


FAMILY = "discrete"  # the env family of this script's saved agents: another script refuses them
# What this script's own options must be, beside the common ones (Part B's RULES).
OPTION_RULES = {}


# --- Environments -------------------------------------------------------------------------------------------
def make_env(env_id: str, idx: int, video_dir: Optional[str] = None) -> Callable[[], gym.Env]:
    """The recipe for env number idx. The one place for a wrapper of your own: every env of every run (training,
    video, evaluation) is made here."""

    def thunk():
        if video_dir is not None and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array")
            env = gym.wrappers.RecordVideo(env, video_dir, disable_logger=True)
        else:
            env = gym.make(env_id)
        obs = env.observation_space
        if isinstance(obs, gym.spaces.Dict) and "action_mask" in obs.spaces:
            env = MaskFromObservation(env)  # a Dict observation's "action_mask" goes to info, as Taxi gives it
        if needs_flattening(env.observation_space):
            # Discrete, Tuple, Dict, MultiDiscrete or multi-dimensional Box observations become one vector
            # (Discrete ones one-hot); images stay as they are, for check_env to send to ppo_atari.py.
            env = gym.wrappers.FlattenObservation(env)
        return env

    return thunk


def make_envs(args: Args, num_envs: int, video_dir: Optional[str] = None) -> gym.vector.VectorEnv:
    """num_envs envs stepped as one batch (core detail 1), with episode statistics, reward scaling with --lstm, and the
    env's action masks appended to the observations when it gives any.

    A gymnasium vector env resets an env on the step after its episode ended (reward 0, action ignored): the training
    loop never trains on that step, and the observation returned when an episode ends is its true final one, which
    truncation bootstraps from.
    """
    recipes = [make_env(args.env_id, i, video_dir) for i in range(num_envs)]
    # CartPole also comes as a numpy-native vector env that steps all copies at once, several times faster
    # than N envs one by one. It bypasses make_env, so it is used only while make_env makes what gym.make does.
    spec = gym.spec(args.env_id.split(":")[-1])
    native = video_dir is None and not args.async_envs and spec.vector_entry_point is not None
    with make_env(args.env_id, 0)() as probe:
        masked = args.action_masks and has_masks(probe, args.env_id)
        if native:
            with gym.make(args.env_id) as plain:
                native = made_alike(probe, plain)
    if native:
        envs = gym.make_vec(args.env_id, num_envs=num_envs, vectorization_mode="vector_entry_point")
    else:
        # One after another in this process, or each in a process of its own (--async-envs).
        envs = vector_env(recipes, args.async_envs)
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    if args.lstm:
        # The critic's LSTM learns from the value loss alone, and learned worse on returns of hundreds than on returns
        # of about 1 (docs/recurrent.md). Rewards divided by the running std of the discounted return, as
        # ppo_continuous.py does.
        envs = ScaleReward(envs, gamma=args.gamma)
    space = envs.single_action_space
    if np.any(getattr(space, "start", 0)):  # Discrete(n, start=s): the agent picks 0..n-1, the env gets s..s+n-1
        from_zero = gym.spaces.Discrete(space.n) if space.shape == () else gym.spaces.MultiDiscrete(space.nvec)
        envs = gym.wrappers.vector.TransformAction(envs, lambda a: a + space.start, single_action_space=from_zero)
    return ActionMasks(envs, args.env_id) if masked else envs


# --- Network ------------------------------------------------------------------------------------------------
def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    # Orthogonal weights, gain sqrt(2) for hidden layers, and constant biases (core detail 2).
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


# --- Recurrence (--lstm): LSTM details 1-3 (4 and 5: minibatches, train) ------------------------------------
def lstm_init(lstm: nn.LSTM) -> nn.LSTM:
    # Orthogonal weights (gain 1) and zero biases (LSTM detail 1), as in the reference implementation.
    for name, param in lstm.named_parameters():
        if name.startswith("weight"):
            nn.init.orthogonal_(param, 1.0)
        else:
            nn.init.zeros_(param)
    return lstm


def recur(lstm: nn.LSTM, x: torch.Tensor, state: torch.Tensor, goes_on) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSTM over one step x (B, features) or a sequence (L, B, features), from state (B, 2 * hidden): h and c side
    by side, zero at every episode's start (LSTM detail 2). goes_on, (B,) or (L, B), or True where no episode ends, is
    False where the observation is its episode's last: the state after it restarts at zero (LSTM detail 3), so nothing
    seen crosses into the next episode, while that last observation's own output (its value, which a time-limit cut
    bootstraps from) still sees its whole episode. Returns the outputs, (B, hidden) or (L, B, hidden), and the state
    after the last step."""
    keep = torch.as_tensor(goes_on, device=x.device).to(x.dtype).expand(x.shape[:-1]).unsqueeze(-1)
    if x.dim() == 2:  # one step (the rollout's): the cell alone costs a third of a call of the whole LSTM
        h, c = torch.lstm_cell(x, state.chunk(2, -1), *lstm.parameters())
        return h, torch.cat([h, c], -1) * keep
    if x.is_cuda:
        # On a GPU the whole LSTM (cuDNN's) runs in TF32 by default, the cell in float32: a replay through it would
        # drift from the rollout's log-probs by about 1e-3. There the replay steps the rollout's cell instead.
        outputs = []
        for t in range(len(x)):
            out, state = recur(lstm, x[t], state, keep[t, :, 0])
            outputs.append(out)
        return torch.stack(outputs), state
    h, c = (s.unsqueeze(0).contiguous() for s in state.chunk(2, -1))
    # One call of the LSTM per stretch without an episode's end: its time loop runs in C++ (oneDNN), not here.
    last_steps = torch.nonzero(keep.amin((1, 2)) == 0).flatten().tolist()  # where some env's episode ends
    ends = [t + 1 for t in last_steps if t + 1 < len(x)] + [len(x)]
    outputs = []
    start = 0
    for end in ends:
        out, (h, c) = lstm(x[start:end], (h, c))
        outputs.append(out)
        ended = keep[end - 1]
        h = h * ended
        c = c * ended
        start = end
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return out, torch.cat([h[0], c[0]], -1)


def sample(logits: torch.Tensor) -> torch.Tensor:
    # Gumbel-max trick: argmax(logits + Gumbel noise) is an exact sample of softmax(logits), and
    # -log(Exp(1)) is Gumbel noise. Much cheaper than building a Categorical every step.
    return (logits - torch.empty_like(logits).exponential_().log()).argmax(-1)


# The network reads observations as float32 vectors: so the rollout buffer and evaluation hold them.
OBS_DTYPE = torch.float32


class Agent(nn.Module):
    """Separate actor and critic MLPs (64-64 tanh; core detail 13): the policy loss cannot disturb the critic. A
    Discrete action is one categorical distribution; MultiDiscrete and MultiBinary actions one per dimension,
    independent, so log-probs and entropies add up (the MultiDiscrete detail). Actions an env's mask forbids
    (ActionMasks appends it to the observation) get probability 0. With --lstm, an LSTM below each MLP: the actor's
    trained by the policy loss, the critic's by the value loss (on scaled rewards, make_envs). obs is (B, *observation
    shape); an action (B,) for Discrete, (B, dims) otherwise.

    What train() and evaluate() call, the same in all three scripts (keep it when you swap the network):
        act(obs, state=None, goes_on=True, deterministic=False) -> (action, state): a sample of the policy, or its
            most likely action
        get_value(obs, state=None) -> value: the critic's V(obs)
        get_action_and_value(obs, action=None, state=None, goes_on=True) -> (action, log-prob, entropy, value, state):
            under the current parameters, for the given actions (or for sampled ones when action is None)
        state_size: 0, or (--lstm) h and c of each LSTM side by side: 2 * its units per LSTM
    obs and actions are batches (B, ...); log-probs, entropies and values (B,). A recurrent agent (--lstm) carries a
    state (B, state_size), zero at an episode's start, from each step to the next; goes_on (B,) is False where obs is
    its episode's last (see recur), True (the default) where no episode ends. It also takes whole sequences: obs
    (L, B, ...), goes_on (L, B), the state before their first step; the outputs are then (L, B, ...). Without an LSTM
    the state passes through untouched, and sequences are batches like any other.
    """

    def __init__(self, envs: gym.vector.VectorEnv, lstm_size: int = 0):
        super().__init__()
        self.nvec = choices(envs.single_action_space)
        self.multi = not isinstance(envs.single_action_space, gym.spaces.Discrete)
        self.mask_size = getattr(envs, "mask_size", 0)  # the action mask's entries at the end of the observation
        obs_dim = envs.single_observation_space.shape[0] - self.mask_size
        self.lstm = lstm_init(nn.LSTM(obs_dim, lstm_size)) if lstm_size else None
        # The critic's own LSTM, as sb3-contrib's RecurrentPPO has it: the value loss shapes a memory of its own and
        # leaves the policy's to the policy loss. It learned better than one LSTM both losses train (docs/recurrent.md).
        self.critic_lstm = lstm_init(nn.LSTM(obs_dim, lstm_size)) if lstm_size else None
        self.state_size = 4 * lstm_size  # h and c of the actor's LSTM, then of the critic's
        features = lstm_size or obs_dim
        self.critic = nn.Sequential(
            layer_init(nn.Linear(features, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        # A 0.01 gain makes the first policy nearly uniform over actions, so early exploration is broad.
        self.actor = nn.Sequential(
            layer_init(nn.Linear(features, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, 64)),
            nn.Tanh(),
            layer_init(nn.Linear(64, sum(self.nvec)), std=0.01),
        )

    def forward(self, obs: torch.Tensor, state: Optional[torch.Tensor] = None, goes_on=True):
        """What the actor and the critic read (the observation without its action mask; with --lstm, the outputs of
        their LSTMs) and the next state."""
        x = obs[..., : -self.mask_size] if self.mask_size else obs
        if self.lstm is None:
            return x, x, state
        actor_state, critic_state = state.chunk(2, -1)
        actor_x, actor_state = recur(self.lstm, x, actor_state, goes_on)
        critic_x, critic_state = recur(self.critic_lstm, x, critic_state, goes_on)
        return actor_x, critic_x, torch.cat([actor_state, critic_state], -1)

    def logits(self, x: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """(B, n) for a Discrete action; (B, dims, most options) otherwise, padded with impossible options."""
        if not self.mask_size:
            logits = self.actor(x)
        else:
            # A large finite negative logit rather than -inf: an invalid action's probability is exactly 0,
            # while the log-probs, the entropy (0 * log 0 would be NaN) and the ratio stay finite.
            logits = torch.where(obs[..., -self.mask_size :] > 0.5, self.actor(x), -1e8)
        if not self.multi:
            return logits
        if len(set(self.nvec)) == 1:
            return logits.unflatten(-1, (len(self.nvec), self.nvec[0]))
        widest = max(self.nvec)
        parts = zip(logits.split(self.nvec, -1), self.nvec)
        return torch.stack([F.pad(part, (0, widest - n), value=-1e8) for part, n in parts], -2)

    def get_value(self, obs: torch.Tensor, state: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.critic(self(obs, state)[1]).squeeze(-1)

    def act(self, obs: torch.Tensor, state: Optional[torch.Tensor] = None, goes_on=True, deterministic: bool = False):
        """The rollout's only forward pass. Its log-probs and values are computed afterwards in one batched
        call (the parameters do not change during a rollout)."""
        x, _, state = self(obs, state, goes_on)
        logits = self.logits(x, obs)
        action = logits.argmax(-1) if deterministic else sample(logits)
        return action, state

    def get_action_and_value(
        self,
        obs: torch.Tensor,
        action: Optional[torch.Tensor] = None,
        state: Optional[torch.Tensor] = None,
        goes_on=True,
    ):
        x, critic_x, state = self(obs, state, goes_on)
        logits = self.logits(x, obs)
        if action is None:
            action = sample(logits)
        logp_all = F.log_softmax(logits, -1)
        logp = logp_all.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        if self.multi:  # independent dimensions: log-probs and entropies add up (the MultiDiscrete detail)
            logp, entropy = logp.sum(-1), entropy.sum(-1)
        return action, logp, entropy, self.critic(critic_x).squeeze(-1), state


# --- Generalized Advantage Estimation -----------------------------------------------------------------------
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    terminations: torch.Tensor,
    dones: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> torch.Tensor:
    """GAE (core detail 5; Schulman et al. 2016, arXiv:1506.02438) over a rollout of T steps of N envs. rewards,
    terminations, dones: (T, N), the outcome of step t's action as 0/1 floats (dones: terminated or truncated); values:
    (T + 1, N), V of every observation including the one after the last step; where an episode ends at t, obs_{t+1}
    is its final one.

    Truncation is not termination: a time-limit cut bootstraps from V(final observation), and only a real terminal
    state is worth 0. Either way the recursion stops at the episode's end. The result is a target: no gradient."""
    with torch.no_grad():
        deltas = rewards + gamma * values[1:] * (1.0 - terminations) - values[:-1]
        discounts = gamma * gae_lambda * (1.0 - dones)
        advantages = []
        next_advantage = torch.zeros_like(deltas[0])
        for delta, discount in zip(deltas.flip(0), discounts.flip(0)):  # backwards in time
            next_advantage = delta + discount * next_advantage
            advantages.append(next_advantage)
    return torch.stack(advantages[::-1])


# --- PPO loss -----------------------------------------------------------------------------------------------
def mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of x, under torchrun of every rank's x together (count, sum, sum of squares summed over ranks)."""
    sums = torch.stack([x.new_tensor(x.numel()), x.sum(), (x**2).sum()]).double()
    n, total, squares = all_sum(sums)
    mean = total / n
    var = (squares - n * mean**2) / (n - 1)
    return mean, var.clamp_min(0).sqrt()


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit std over the minibatch (core detail 7); under torchrun over every rank's part of it."""
    mean, std = mean_std(x)  # in float64
    return ((x - mean) / (std + 1e-8)).to(x.dtype)


def ppo_loss(
    newlogp: torch.Tensor,
    oldlogp: torch.Tensor,
    advantages: torch.Tensor,
    newvalue: torch.Tensor,
    oldvalue: torch.Tensor,
    returns: torch.Tensor,
    entropy: torch.Tensor,
    clip_coef: float,
    vf_coef: float,
    ent_coef: float,
    norm_adv: bool = True,
    clip_vloss: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate + value loss - entropy bonus for one minibatch; returns (loss, its parts)."""
    advantages = advantages.detach()  # a target: no gradient may flow into whatever produced it
    if norm_adv:
        # Per-minibatch normalization keeps the advantage scale fixed, so one clip_coef fits every task.
        advantages = normalize(advantages)

    # Importance sampling: the batch was drawn from the old policy, ratio = pi_new / pi_old.
    logratio = newlogp - oldlogp
    ratio = logratio.exp()
    # The clipped surrogate (core detail 8). The pessimistic minimum gives zero gradient once the ratio leaves
    # [1 - eps, 1 + eps] in the direction the advantage favours: no incentive to move further from the old policy.
    clipped_ratio = torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = torch.max(-advantages * ratio, -advantages * clipped_ratio).mean()

    if clip_vloss:
        # Value loss clipping (core detail 9): the critic moves at most clip_coef from its old value.
        v_clipped = oldvalue + torch.clamp(newvalue - oldvalue, -clip_coef, clip_coef)
        v_loss = 0.5 * torch.max((newvalue - returns) ** 2, (v_clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((newvalue - returns) ** 2).mean()

    # The overall loss, with an entropy bonus (core detail 10).
    entropy_loss = entropy.mean()
    loss = pg_loss - ent_coef * entropy_loss + vf_coef * v_loss

    stats = {
        "policy_loss": pg_loss.detach(),
        "value_loss": v_loss.detach(),
        "entropy": entropy_loss.detach(),
        "logratio": logratio.detach(),
    }
    return loss, stats


# --- Training -----------------------------------------------------------------------------------------------
def policy_shift(logratio: torch.Tensor, clip_coef: float) -> dict[str, torch.Tensor]:
    """How far the new policy moved from the one that collected the batch, from log(pi_new / pi_old): the debug
    variables of core detail 12. Means over every rank's samples under torchrun, so that all ranks take the same
    target-KL decision."""
    with torch.no_grad():
        ratio = logratio.exp()
        local = [
            logratio.new_tensor(logratio.numel()),
            # KL(old || new) estimators, http://joschu.net/blog/kl-approx.html: the naive -log r and the
            # unbiased, always non-negative (r - 1) - log r.
            -logratio.sum(),
            ((ratio - 1) - logratio).sum(),
            ((ratio - 1.0).abs() > clip_coef).float().sum(),
            ratio.sum(),
            (ratio**2).sum(),
        ]
        n, naive_kl, kl, clipped, ratios, squares = all_sum(torch.stack(local))
        return {
            "old_approx_kl": naive_kl / n,
            "approx_kl": kl / n,
            "clipfrac": clipped / n,
            # Effective sample size of the importance weights as a fraction of the batch: 1 while
            # new == old, falling toward 0 as a few samples dominate the gradient estimate.
            "ess": ratios**2 / (n * squares),
        }


def explained_variance(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    """[1 - Var(returns - values) / Var(returns), whether the returns vary enough for it to say anything]: how well
    the critic predicts, over every rank's batch. A tensor, read with the update's other diagnostics."""
    y = y_true.double()
    e = (y_true - y_pred).double()
    local = [y.new_tensor(y.numel()), y.sum(), (y**2).sum(), e.sum(), (e**2).sum(), y.abs().sum()]
    n, y_sum, y_squares, e_sum, e_squares, y_abs = all_sum(torch.stack(local))
    var_y = (y_squares - y_sum**2 / n) / (n - 1).clamp_min(1)
    var_e = (e_squares - e_sum**2 / n) / (n - 1).clamp_min(1)
    ev = torch.where(var_y > 0, 1 - var_e / var_y, torch.nan)
    varies = (var_y > 0) & (var_y.sqrt() > 0.05 * y_abs / n)  # a std under 5% of the mean size is noise
    return torch.stack([ev, varies.double()]).float()


def stretches(num_envs: int, num_minibatches: int) -> int:
    """The stretches each env's rollout is cut into with --lstm: the fewest that the minibatches can share evenly."""
    return num_minibatches // math.gcd(num_envs, num_minibatches)


def minibatches(b_inds: torch.Tensor, args: Args, device: torch.device) -> tuple[torch.Tensor, ...]:
    """One epoch's minibatches (core detail 6), as indices into the rollout flattened step by step (t * N + env).

    Feedforward: the transitions (b_inds) shuffled and split. With --lstm, whole sequences in time order
    (LSTM detail 4), each an (L, sequences) block: every env's rollout, cut into `chunks` stretches of L consecutive
    steps where there are fewer envs than minibatches (`stretches`), shuffled and split. The update replays them and
    then drops the steps that only reset an env."""
    if not args.lstm:
        return torch.tensor_split(b_inds[torch.randperm(len(b_inds), device=device)], args.num_minibatches)
    N = args.num_envs
    M = args.num_minibatches
    chunks = stretches(N, M)
    L = args.num_steps // chunks
    chunk_starts = torch.arange(chunks, device=device)[:, None] * L * N
    starts = (chunk_starts + torch.arange(N, device=device)).flatten()  # every sequence's first index
    steps = torch.arange(L, device=device)[:, None] * N
    shuffled = starts[torch.randperm(len(starts), device=device)]
    return tuple(steps + s for s in torch.tensor_split(shuffled, M))


def train(args: Args, stop_at_step: Optional[int] = None) -> dict:
    """Train PPO; returns the agent, its run folder and the episodes seen ({"returns", "lengths", "steps", "times"}).

    stop_at_step ends training early at that global step while the learning-rate schedule still runs
    over args.total_timesteps (to look at the first part of a full-length run).
    """
    with Run(args, stop_at_step) as run:  # checks the options, joins torchrun, seeds the random streams
        device = run.device
        envs = make_envs(args, args.num_envs, run.video_dir)
        agent = Agent(envs, args.lstm_hidden_size if args.lstm else 0).to(device)
        # Listed once: walking the module tree costs about 0.1 ms, paid twice per minibatch otherwise.
        params = list(agent.parameters())
        # Adam eps 1e-5 (core detail 3) instead of torch's 1e-8; the fused kernel does the whole step in one call.
        optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5, fused=True)
        loss_fn = ppo_loss
        if args.compile:  # torch.compile: the agent's forward passes and the loss, with their backward
            agent.act = torch.compile(agent.act)
            loss_fn = torch.compile(ppo_loss)
            agent.get_action_and_value = torch.compile(agent.get_action_and_value)

        # Rollout storage. obs and valid have T + 1 rows: the last is where the next rollout starts, and the
        # observation after the last step is also what the rollout's last value bootstraps from.
        T = args.num_steps
        N = args.num_envs
        obs = torch.zeros((T + 1, N, *envs.single_observation_space.shape), dtype=OBS_DTYPE, device=device)
        actions = torch.zeros((T, N, *envs.single_action_space.shape), dtype=torch.long, device=device)
        # Env outputs stay in numpy during the rollout; they become tensors once per rollout, not once per step.
        rewards = np.zeros((T, N), dtype=np.float32)
        terminations = np.zeros((T, N), dtype=np.float32)
        dones = np.zeros((T, N), dtype=np.float32)
        valid = np.zeros((T + 1, N), dtype=bool)  # False where a step only reset an env whose episode had ended
        states = torch.zeros((T + 1, N, agent.state_size), device=device)  # the LSTM state before each step
        envs = run.start(agent, optimizer, envs, obs, valid, states)  # resumes from the checkpoint, or resets the envs

        for iteration in run.iterations():  # between updates: checkpoints, and the stop on Ctrl-C or SIGTERM
            if args.anneal_lr:  # linearly to 0 over training (core detail 4)
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (iteration - 1.0) / args.num_iterations)

            # --- rollout: the actor alone, no autograd bookkeeping; it starts where the last one ended ---
            obs[0] = obs[T]
            valid[0] = valid[T]
            states[0] = states[T]
            with torch.inference_mode():
                for step in range(T):
                    action, states[step + 1] = agent.act(obs[step], states[step], torch.from_numpy(valid[step]))
                    actions[step] = action
                    # On the CPU .cpu() is free; with a GPU this is the one unavoidable copy per step.
                    next_obs, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
                    rewards[step] = reward
                    terminations[step] = terminated
                    done = np.logical_or(terminated, truncated)
                    dones[step] = done
                    # The step after an episode ends only resets that env: not a transition to learn from.
                    valid[step + 1] = ~done
                    obs[step + 1] = torch.as_tensor(next_obs, device=device)
                    run.record(info)  # counts the steps; keeps the returns of the episodes that ended

            # --- the old policy's log-probs and values, and advantages, in one batched pass ---
            # The rollout's host arrays go to the device before anything else is queued there: a copy from the
            # host waits for the device's queue, which is empty now.
            b_inds = torch.from_numpy(np.flatnonzero(valid[:T])).to(device)  # the transitions, found on the host
            rewards_t, terminations_t, dones_t, valid_t = (
                torch.from_numpy(x).to(device) for x in (rewards, terminations, dones, valid[:T])
            )
            with torch.no_grad():  # (T, N) at once; with --lstm the rollout's sequences replayed from its first state
                _, logprobs, _, values, _ = agent.get_action_and_value(obs[:-1], actions, states[0], valid_t)
                values = torch.cat([values, agent.get_value(obs[T], states[T])[None]])
                advantages = compute_gae(rewards_t, values, terminations_t, dones_t, args.gamma, args.gae_lambda)
            b_obs, b_actions, b_states, b_valid = (x.flatten(0, 1) for x in (obs[:-1], actions, states[:-1], valid_t))
            b_logprobs, b_values, b_advantages = (x.flatten() for x in (logprobs, values[:-1], advantages))
            b_returns = b_advantages + b_values

            # --- K epochs of minibatch Adam on the batch ---
            mb_stats = []
            for epoch in range(args.update_epochs):  # noqa: B007 (read after the loop: the epochs run)
                logratios = []
                for mb in minibatches(b_inds, args, device):
                    if args.lstm:  # each sequence replayed from the rollout's state at its start (LSTM detail 5)
                        _, newlogp, entropy, newvalue, _ = agent.get_action_and_value(
                            b_obs[mb], b_actions[mb], b_states[mb[0]], b_valid[mb]
                        )
                        keep = b_valid[mb]  # then the steps that only reset an env are dropped
                        mb, newlogp, entropy, newvalue = (x[keep] for x in (mb, newlogp, entropy, newvalue))
                    else:
                        _, newlogp, entropy, newvalue, _ = agent.get_action_and_value(b_obs[mb], b_actions[mb])
                    loss, stats = loss_fn(
                        newlogp,
                        b_logprobs[mb],
                        b_advantages[mb],
                        newvalue,
                        b_values[mb],
                        b_returns[mb],
                        entropy,
                        clip_coef=args.clip_coef,
                        vf_coef=args.vf_coef,
                        ent_coef=args.ent_coef,
                        norm_adv=args.norm_adv,
                        clip_vloss=args.clip_vloss,
                    )
                    optimizer.zero_grad()
                    loss.backward()
                    average_gradients(params)  # under torchrun: the mean over the ranks, before clipping
                    grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)  # core detail 11
                    run.check_finite(loss, grad_norm)  # a NaN or infinite loss stops the run before its step
                    optimizer.step()
                    logratios.append(stats.pop("logratio"))
                    mb_stats.append(torch.stack([*stats.values(), grad_norm]))
                shift = policy_shift(torch.cat(logratios), args.clip_coef)
                if args.target_kl is not None and shift["approx_kl"] > args.target_kl:
                    break  # early stop on target KL, an addition to the 37 details: the policy moved far enough

            # --- diagnostics: losses averaged over the minibatches, the policy's shift over the last epoch ---
            means = torch.stack(mb_stats).mean(0)
            diagnostics = {**dict(zip([*stats, "grad_norm"], means)), **shift}
            ev = explained_variance(b_values[b_inds], b_returns[b_inds])
            run.log_update(diagnostics, ev, epochs=epoch + 1)
        return run.result(agent)


# --- make_envs' helpers: flattening, action masks, action dimensions, CartPole's own vector env -------------
def needs_flattening(space: gym.Space) -> bool:
    if isinstance(space, gym.spaces.Box):
        image = len(space.shape) == 3 or (len(space.shape) == 2 and space.dtype == np.uint8)
        return len(space.shape) != 1 and not image
    return space.is_np_flattenable


def has_masks(env: gym.Env, env_id: str) -> bool:
    """Whether the env says which actions are valid (info["action_mask"]) from its first observation on. One that says
    so only after a step trains without masks, and a warning says why."""
    if "action_mask" in env.reset(seed=0)[1]:
        return True
    with contextlib.suppress(Exception):  # a strict env may refuse a random action: then there is nothing to tell
        if "action_mask" in env.step(env.action_space.sample())[-1]:
            print(
                f"warning: --env-id {env_id} gives info['action_mask'] after a step but not at reset; it trains "
                "without masks (give the mask at reset too)",
                file=sys.stderr,
            )
    return False


def made_alike(env: gym.Env, other: gym.Env) -> bool:
    """Whether env was made as other: the same wrappers, and the same arguments to gym.make."""
    kinds = [[], []]
    for kind, e in zip(kinds, (env, other)):
        while isinstance(e, gym.Wrapper):
            kind.append(type(e))
            e = e.env
    return kinds[0] == kinds[1] and env.spec == other.spec


class MaskFromObservation(gym.ObservationWrapper):
    """Moves a Dict observation's "action_mask" (the multi-agent libraries' convention) to info (gymnasium's)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = gym.spaces.Dict({k: v for k, v in env.observation_space.items() if k != "action_mask"})

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self.observation(obs), {**info, "action_mask": obs["action_mask"]}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self.observation(obs), reward, terminated, truncated, {**info, "action_mask": obs["action_mask"]}

    def observation(self, obs: dict) -> dict:
        return {k: v for k, v in obs.items() if k != "action_mask"}


class ActionMasks(gym.vector.VectorWrapper):
    """Appends each env's action mask (info["action_mask"]: 1 for each allowed option of each action dimension) to its
    observation as 0/1 floats: the rollout, checkpoints, torchrun and evaluation carry it with no code of their own."""

    def __init__(self, envs: gym.vector.VectorEnv, env_id: str):
        super().__init__(envs)
        self.env_id = env_id
        self.nvec = choices(envs.single_action_space)
        self.mask_size = int(sum(self.nvec))
        size = envs.single_observation_space.shape[0] + self.mask_size
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, envs.num_envs)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self.append(obs, info), info

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        return self.append(obs, info, terminated | truncated), reward, terminated, truncated, info

    def append(self, obs: np.ndarray, info: dict, ended: np.ndarray = False) -> np.ndarray:
        no_mask = np.zeros((len(obs), 0))
        mask = np.asarray(info.get("action_mask", no_mask)).reshape(len(obs), -1)
        if mask.shape[1] != self.mask_size:
            raise UsageError(
                f"--env-id {self.env_id} gave an action mask of {mask.shape[1]} entries, not one per "
                f"action ({self.mask_size}); or pass --no-action-masks"
            )
        # An episode's final observation may allow no action: the step from it only resets the env, and is not learned.
        firsts = np.cumsum([0, *self.nvec[:-1]])  # each action dimension's first entry in the mask
        allowed = np.add.reduceat(mask > 0, firsts, axis=1) | np.reshape(ended, (-1, 1))
        if not allowed.all():
            env, dim = np.argwhere(allowed == 0)[0]
            raise UsageError(
                f"--env-id {self.env_id} gave an action mask that allows no action (env {env}, action "
                f"dimension {dim}); an env must leave at least one action open"
            )
        return np.concatenate([obs, mask > 0], axis=1, dtype=np.float32)


def choices(space: gym.Space) -> list[int]:
    """The number of options of each action dimension (MultiBinary: 2 each)."""
    if isinstance(space, gym.spaces.Discrete):
        return [int(space.n)]
    if isinstance(space, gym.spaces.MultiDiscrete):
        return [int(n) for n in space.nvec.ravel()]
    return [2] * int(np.prod(space.shape))


# --- What Part B needs of this script's envs: checks, checkpoints, the statistics saved with the agent ------
def check_env(env_id: str) -> None:
    """Refuse, in one line, an env whose spaces this script cannot learn, and name the script that can."""
    if env_id.split(":")[-1].startswith("ALE/") or "NoFrameskip" in env_id:
        raise UsageError(f"--env-id {env_id} is an Atari game; train it with ppo_atari.py")
    env = make_env(env_id, 0)()
    act = env.action_space
    obs = env.observation_space
    env.close()
    if isinstance(act, gym.spaces.Box):
        raise UsageError(f"--env-id {env_id} has continuous actions ({act}); train it with ppo_continuous.py")
    discrete = isinstance(act, (gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary))
    if not discrete or len(act.shape) > 1:
        raise UsageError(
            f"--env-id {env_id} has a {type(act).__name__} action space of shape {act.shape}; this "
            "script needs Discrete actions, or one-dimensional MultiDiscrete or MultiBinary ones"
        )
    if isinstance(obs, gym.spaces.Box) and len(obs.shape) > 1:
        raise UsageError(f"--env-id {env_id} has image-like observations {obs.shape}; train it with ppo_atari.py")
    if not isinstance(obs, gym.spaces.Box):
        raise UsageError(
            f"--env-id {env_id} has {type(obs).__name__} observations, which do not flatten to a "
            "vector; turn them into one with a wrapper in make_env"
        )


def env_state(env: gym.Env) -> bytes:
    """Everything a checkpoint needs to continue one env exactly: the env and its wrappers pickle as they are."""
    return cloudpickle.dumps(env)


def restore_env_state(state: bytes) -> gym.Env:
    return pickle.loads(state)


def env_stats(envs: gym.vector.VectorEnv) -> dict:
    """What the envs learned that belongs to the trained model, saved with it: nothing here (in ppo_continuous.py,
    the observation statistics)."""
    return {}


def load_env_stats(envs: gym.vector.VectorEnv, stats: dict) -> None:
    """Use a saved agent's env statistics, frozen, in new envs: nothing to do here."""


class ScaleReward(gym.wrappers.vector.NormalizeReward):
    """gymnasium's reward scaling, in the order of the reference implementation (baselines' VecNormalize): each step
    adds the reward to the discounted return and updates its statistics, then every episode end, a cut as well as a
    termination, starts the return at 0. (gymnasium's own drops the return at a termination one step early and
    carries it through cuts.) The step after an episode's end only resets its env and adds nothing."""

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        active = ~self._prev_dones.astype(bool)
        self.accumulated_reward[active] = self.accumulated_reward[active] * self.gamma + reward[active]
        if self._update_running_mean and active.any():
            self.return_rms.update(self.accumulated_reward[active])
        self._prev_dones = (terminated | truncated).astype(np.float32)
        self.accumulated_reward[terminated | truncated] = 0.0
        return obs, reward / np.sqrt(self.return_rms.var + self.epsilon), terminated, truncated, info


def life_lost(before: dict, after: dict) -> np.ndarray:
    """Where a step lost a life (an Atari game's, ppo_atari.py), from the envs' info before and after it: evaluation
    restarts an LSTM's state there, as training does. These envs have no lives; evaluation plays one env."""
    return np.zeros(1, bool)


# ====================================================================================================
# Part B: running the experiment
#
# Everything below runs the experiment around train() and changes no number PPO computes: checks, torchrun, resume,
# logs, progress, health warnings, checkpoints, signals, crashes, evaluation of a saved agent, main(). It is the same
# text in all three scripts (a test keeps it so): what differs by env family comes from Part A's FAMILY, OPTION_RULES,
# check_env, make_envs, env_state, restore_env_state, env_stats, load_env_stats, life_lost, OBS_DTYPE and Agent.
# ====================================================================================================
SCRIPT = os.path.basename(__file__)  # messages and resume commands name this file, so a copy names itself


class UsageError(Exception):
    """Bad input, found before training starts: one line on stderr, exit status 2."""


class RunError(Exception):
    """A fault that stops a run (a NaN loss, an env at fault, a full disk): one line, exit status 1."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- checks before anything is built ------------------------------------------------------------------------
POSITIVE = (lambda v: v > 0, "positive")
AT_LEAST_0 = (lambda v: v >= 0, "0 or more")
RULES = {  # what the options of every script must be; Part A's OPTION_RULES adds the family's own
    **dict.fromkeys(
        (
            "total_timesteps",
            "num_envs",
            "num_steps",
            "num_minibatches",
            "update_epochs",
            "learning_rate",
            "clip_coef",
            "max_grad_norm",
            "target_kl",
            "eval_episodes",
            "lstm_hidden_size",
        ),
        POSITIVE,
    ),
    **dict.fromkeys(("ent_coef", "vf_coef", "checkpoint_every", "checkpoint_minutes"), AT_LEAST_0),
    **dict.fromkeys(("gamma", "gae_lambda"), (lambda v: 0 <= v <= 1, "in [0, 1]")),
    "seed": (lambda v: 0 <= v < 2**31, "in [0, 2**31)"),  # numpy's seeds end at 2**32, and evaluation adds 1e9
    "eval_seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "torch_threads": (lambda v: 0 <= v <= os.cpu_count(), f"in [0, {os.cpu_count()}], the cores here (0: all)"),
}
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the network computes in float32: a larger option overflows there


def check_args(args: Args) -> None:
    """Refuse bad options and envs before anything is built, in one line naming the value and what would work."""
    for name, value in asdict(args).items():
        if isinstance(value, float) and not abs(value) <= FLOAT32_MAX:
            raise UsageError(f"{flag(name)} is {value}; it must be a finite number of at most {FLOAT32_MAX:.1e}")
        ok, must = {**RULES, **OPTION_RULES}.get(name, (None, ""))
        if ok is not None and value is not None and not ok(value):
            raise UsageError(f"{flag(name)} is {value}; it must be {must}")
    check_minibatches(args)
    if args.num_iterations == 0:
        ranks = " * ranks" if args.world_size > 1 else ""
        raise UsageError(
            f"--total-timesteps {args.total_timesteps} is less than one batch "
            f"({args.batch_size * args.world_size} = num_envs * num_steps{ranks}); raise it"
        )
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # --env-id module:Env-v0 finds module.py in the current folder too
    try:  # gymnasium's own message for an unknown id, a missing package, a module that registers no such env
        check_env(args.env_id)
    except (gym.error.Error, ImportError, ValueError) as e:
        raise UsageError(f"--env-id {args.env_id}: {first_line(e)}") from None


def check_minibatches(args: Args) -> None:
    """Every minibatch must hold 2 transitions to normalize its advantages, where half the steps may only reset an env
    (an episode's end costs a step that is not learned from). With --lstm a minibatch takes whole env sequences, cut
    as minibatches() cuts them."""
    batch = args.batch_size
    m = args.num_minibatches

    def fits(count: int) -> bool:
        if batch % count:
            return False
        if not args.lstm:
            return args.num_envs * (args.num_steps // 2) >= 2 * count
        cuts = stretches(args.num_envs, count)
        if args.num_steps % cuts:
            return False
        sequences = args.num_envs * cuts // count
        return sequences * (args.num_steps // cuts // 2) >= 2

    if fits(m):
        return
    near = nearest(m, fits, batch)
    hint = f"e.g. {near}" if near else "raise --num-steps"
    if args.lstm:
        what = "whole env sequences (each env's rollout, or equal stretches of it when there are fewer envs than "
        what += "minibatches)"
    else:
        what = "an equal share of it"
    lstm = ", --lstm" if args.lstm else ""
    raise UsageError(
        f"--num-minibatches {m} does not fit the batch (num_envs * num_steps = {args.num_envs} * {args.num_steps} = "
        f"{batch}{lstm}): each minibatch takes {what} and needs 2 transitions where half the steps only reset an env; "
        f"{hint}"
    )


def nearest(start: int, fits: Callable[[int], bool], limit: int) -> Optional[int]:
    """The number in [1, limit] nearest start for which fits() holds, searched outward (a batch may hold billions of
    steps, and a count asked for may be larger still)."""
    start = min(start, limit)
    for distance in range(limit):
        for count in (start - distance, start + distance):
            if 0 < count <= limit and fits(count):
                return count
    return None


# Options that only watch the run, or step its envs another way (the same episodes), may change on resume, and so may
# the budget; any other change is refused.
FREE_ON_RESUME = (
    "progress",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "checkpoint_every",
    "checkpoint_minutes",
    "resume",
    "eval_checkpoint",
    "eval_episodes",
    "eval_seed",
    "eval_deterministic",
    "exp_name",
    "run_name",
    "async_envs",
    "total_timesteps",
    "save_model",
)
CHECKPOINT_FORMAT = 3


CHECKPOINT_PARTS = {"iteration": int, "global_step": int, "ranks": list, "episodes": list, "elapsed": (int, float)}


def load_checkpoint(args: Args) -> dict:
    """The checkpoint to resume from, once it is known to continue this run as an uninterrupted one would, in its own
    folder, which no finished run holds."""
    path = args.resume
    ckpt = load_file(path, "--resume")
    if "optimizer" not in ckpt:
        raise UsageError(f"--resume {path} is a saved agent, not a checkpoint (runs/<run_name>/checkpoint.pt)")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"--resume {path} was written by another version of {ckpt.get('script')}; finish it with that")
    for part, kind in CHECKPOINT_PARTS.items():
        if not isinstance(ckpt.get(part), kind):
            raise UsageError(f"--resume {path} has no valid '{part}'; it is not a whole checkpoint of {SCRIPT}")
    saved = saved_args(ckpt, f"--resume {path}")
    for name, value in asdict(args).items():  # an option the checkpoint predates had its default value
        if name not in FREE_ON_RESUME and getattr(saved, name) != value:
            raise UsageError(
                f"--resume {path} was trained with {flag(name)} {getattr(saved, name)}, not {value}; a resumed run "
                "goes on as it started (only the budget and what watches it may change)"
            )
    if args.run_name not in (None, saved.run_name):
        raise UsageError(
            f"--run-name {args.run_name}: a resumed run goes on in its own folder, runs/{saved.run_name}; drop "
            "--run-name"
        )
    if has_finished(os.path.join("runs", saved.run_name)):
        raise UsageError(
            f"--resume {path}: the run runs/{saved.run_name} has finished, and its results are never written again; "
            "a checkpoint continues an unfinished run only (to train longer, start a new run)"
        )
    if len(ckpt["ranks"]) != args.world_size:
        raise UsageError(
            f"--resume {path} was written by {len(ckpt['ranks'])} process(es), not {args.world_size}; "
            "resume it with as many (torchrun --nproc-per-node, or python for 1)"
        )
    if args.total_timesteps < ckpt["global_step"]:
        raise UsageError(
            f"--total-timesteps {args.total_timesteps} is less than the {ckpt['global_step']} steps "
            f"{path} has already trained"
        )
    args.run_name = saved.run_name
    return ckpt


def has_finished(folder: str) -> bool:
    """Whether the run in this folder trained to its end (its summary.json says so)."""
    try:
        with open(os.path.join(folder, "summary.json")) as f:
            return json.load(f).get("finished") is True
    except (OSError, ValueError, AttributeError):
        return False


# --- data-parallel training (torchrun) ----------------------------------------------------------------------
# `torchrun --nproc-per-node N <script> ...` starts N copies of the script, the ranks. Each steps its own envs and
# computes the loss on its own batch; every minibatch the ranks average their gradients, so all take the same Adam
# step: one agent learning from N times the data. A plain run is rank 0 of 1, and nothing here communicates.
def init_distributed(use_cuda: bool) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the other ranks when started by torchrun (Gloo on CPUs, NCCL on GPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = use_cuda and torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if world_size == 1:
        return 0, 1, device
    if cuda and device.index >= torch.cuda.device_count():
        raise UsageError(
            f"this node runs more ranks than its {torch.cuda.device_count()} GPU(s); use "
            f"--nproc-per-node {torch.cuda.device_count()}, or --no-cuda to train on the CPUs"
        )
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), world_size, device


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over all ranks (x itself in a plain run)."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def average_gradients(params: list[torch.Tensor]) -> None:
    """Each gradient replaced by its mean over the ranks, in one flat all-reduce (as DistributedDataParallel does)."""
    if dist.is_available() and dist.is_initialized():
        grads = [p.grad for p in params]
        mean = all_sum(torch.cat([g.flatten() for g in grads])) / dist.get_world_size()
        for g, m in zip(grads, mean.split([g.numel() for g in grads])):
            g.copy_(m.view_as(g))


# --- vector envs: stepped here or in processes of their own, checked, saved, restored -----------------------
def vector_env(recipes: list, async_envs: bool, pending: Optional[np.ndarray] = None) -> gym.vector.VectorEnv:
    """The recipes' envs stepped as one: one after another here, or each in a process of its own (--async-envs)."""
    pending = np.zeros(len(recipes), bool) if pending is None else pending
    checked = [functools.partial(EnvCheck, recipe, i, p) for i, (recipe, p) in enumerate(zip(recipes, pending))]
    return AsyncEnvs(checked) if async_envs else gym.vector.SyncVectorEnv(checked)


class AsyncEnvs(gym.vector.AsyncVectorEnv):
    """gymnasium's AsyncVectorEnv, whose worker's error reaches the run as it was raised, in one line: gymnasium logs
    every failed worker's traceback before raising it."""

    def _raise_if_errors(self, successes) -> None:
        level = gym.logger.min_level
        gym.logger.min_level = gym.logger.ERROR + 1
        try:
            super()._raise_if_errors(successes)
        finally:
            gym.logger.min_level = level


class EnvCheck(gym.Wrapper):
    """Blames the env when it is at fault: an observation that does not fit its space, or a non-finite observation or
    reward, stops the run in one line naming the env, its step, its space and what it returned. Also saves the env for
    checkpoints (in its own process with --async-envs), and resets a restored env whose episode had ended (pending)."""

    def __init__(self, recipe: Callable[[], gym.Env], index: int, pending: bool = False):
        if multiprocessing.current_process().name != "MainProcess":
            # A Ctrl-C or SIGTERM reaches every process of the group: the training process finishes its update first.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        super().__init__(recipe())
        self.index = index
        self.steps = 0
        self.pending = pending
        self.space = self.env.observation_space

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self.check(obs, 0.0), info

    def step(self, action):
        if self.pending:
            self.pending = False
            obs, info = self.env.reset()
            return self.check(obs, 0.0), 0.0, False, False, info
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        return self.check(obs, reward), reward, terminated, truncated, info

    def check(self, obs, reward):
        obs = np.asarray(obs)
        fault = self.fault(obs, reward)
        if fault:
            name = getattr(self.env.spec, "id", self.env)
            raise RunError(
                f"env {self.index} ({name}) returned {fault} at its step {self.steps}, where its observation space is "
                f"{self.space}"
            )
        return obs

    def fault(self, obs: np.ndarray, reward) -> Optional[str]:
        """What is wrong with what the env returned, or None."""
        if obs.shape != self.space.shape:
            return f"an observation of shape {obs.shape}"
        if not np.can_cast(obs.dtype, self.space.dtype, "same_kind"):
            return f"an observation of dtype {obs.dtype}"
        if np.issubdtype(self.space.dtype, np.floating) and not np.isfinite(obs).all():
            return "a non-finite observation"
        if not math.isfinite(reward):
            return f"a reward of {reward}"
        return None

    def checkpoint_state(self) -> dict:
        return env_state(self.env)


def rank_state(envs: gym.vector.VectorEnv, with_envs: bool = True) -> dict:
    """A rank's random streams and vector env, pickled ("state"): its wrappers (with their statistics) and its envs,
    each by env_state; without with_envs, or where the envs cannot be pickled (an open file, a C++ vector env), new
    episodes on resume, and "new_episodes" says why."""
    bottom = envs.unwrapped
    inner = envs  # the innermost wrapper, above the vector env itself
    while isinstance(inner, gym.vector.VectorWrapper) and inner.env is not bottom:
        inner = inner.env
    saved = None
    why = None if with_envs else "written after a crash"
    try:  # a vector env of its own (CartPole's) pickles whole; each env of the others is saved by env_state
        if with_envs and isinstance(bottom, (gym.vector.SyncVectorEnv, gym.vector.AsyncVectorEnv)):
            saved = cloudpickle.dumps(list(bottom.call("checkpoint_state")))
        elif with_envs:
            saved = cloudpickle.dumps(bottom)
    except Exception as e:
        why = f"its envs cannot be saved: {first_line(e)}"
    rng = (
        torch.get_rng_state(),
        np.random.get_state(),
        random.getstate(),
        torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
    )
    wrapped = inner is not bottom
    if wrapped:
        inner.env = None  # the wrappers are pickled without the envs under them
    try:
        return {
            "state": cloudpickle.dumps({"wrappers": envs if wrapped else None, "envs": saved, "rng": rng}),
            "new_episodes": why,
        }
    finally:
        if wrapped:
            inner.env = bottom


def restore_rank(envs: gym.vector.VectorEnv, saved: bytes, pending: np.ndarray, async_envs: bool):
    """The random streams as they were, and the envs to go on with (envs: new ones) and whether they are the saved
    ones; pending: the envs whose episode ended on the checkpoint's last step, which the next step only resets."""
    state = pickle.loads(saved)  # the checkpoint's pickled code runs here, on resume, after every check of the file
    torch.set_rng_state(state["rng"][0])
    np.random.set_state(state["rng"][1])
    random.setstate(state["rng"][2])
    if state["rng"][3] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"][3])  # the sampling noise and shuffles on the GPU
    bottom = envs.unwrapped
    if state["envs"] is not None:
        envs.close()
        bottom = pickle.loads(state["envs"])
        if isinstance(bottom, list):
            bottom = vector_env([functools.partial(restore_env_state, s) for s in bottom], async_envs, pending)
    inner = state["wrappers"]
    while inner is not None and inner.env is not None:
        inner = inner.env
    if inner is not None:
        inner.env = bottom
    return state["wrappers"] or bottom, state["envs"] is not None


# --- files: written whole or not at all, read without running code ------------------------------------------
def write_file(path: str, data: bytes | dict) -> None:
    """Write through a temporary file of this process, then rename: a crash or a full disk never leaves a half-written
    file in place of the last good one. A dict goes through torch.save, in memory (its file writer hides the cause)."""
    if isinstance(data, dict):
        buffer = io.BytesIO()
        torch.save(data, buffer)
        data = buffer.getvalue()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise RunError(f"cannot write {path} ({e.strerror}); the last good file there, if any, is kept") from None


def load_file(path: str, what: str) -> dict:
    """A saved agent or checkpoint of this env family, read with weights_only=True: no code stored in it runs."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a folder; pass the file in it, e.g. {os.path.join(path, 'checkpoint.pt')}")
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} does not exist; pass a file such as runs/<run_name>/checkpoint.pt or agent.pt")
    if what == "--resume":
        why = "a checkpoint holds its envs pickled, and resuming one runs code from it: resume only your own runs, "
        why += "share agent.pt"
    else:
        why = "no code stored in it was run"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message would advise weights_only=False: the very risk refused here
        cause = "it holds objects beyond tensors, numbers and strings, which could run code when loaded"
        raise UsageError(f"{what} {path} cannot be read as a file of {SCRIPT} ({cause}); {why}") from None
    except Exception as e:
        raise UsageError(f"{what} {path} cannot be read as a file of {SCRIPT} ({first_line(e)}); {why}") from None
    if not isinstance(data, dict) or not isinstance(data.get("args"), dict) or not isinstance(data.get("model"), dict):
        raise UsageError(f"{what} {path} is not a file written by {SCRIPT}; {why}")
    family = data.get("family", str(data.get("script")).removeprefix("ppo_"))  # older files name their script
    if family != FAMILY:
        raise UsageError(f"{what} {path} holds a {family} agent; this script trains {FAMILY} ones")
    return data


def load_weights(module: nn.Module, state: dict, what: str) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{what} does not fit this network ({first_line(e)})") from None


def check_shapes(module: nn.Module, state: dict, what: str) -> None:
    """Refuse weights that do not fit the module, by their shapes alone (the module may be on the meta device)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    if found != expected:
        name = sorted(set(expected) ^ set(found) or {k for k in expected if expected[k] != found[k]})[0]
        raise UsageError(
            f"{what} does not fit the network its options describe ({name}: {found.get(name)} in the file, "
            f"{expected.get(name)} by its options)"
        )


def saved_args(data: dict, what: str) -> Args:
    """The options a saved agent or checkpoint was trained with (options it does not know keep their defaults), each
    of its option's type: a file's options steer nothing until they are known to be options."""
    hints = typing.get_type_hints(Args)
    for name, value in data["args"].items():
        if name in hints and not of_type(value, hints[name]):
            raise UsageError(
                f"{what} holds {flag(name)} {value!r}, not a value of that option; it is not a file of {SCRIPT}"
            )
    return Args(**{k: v for k, v in data["args"].items() if k in hints})


def of_type(value, hint) -> bool:
    """Whether value is one of an Args field's type (Optional[int]: None or an int; a float option takes an int)."""
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    kinds = typing.get_args(hint) or (hint,)
    if float in kinds:
        kinds = (*kinds, int)
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds)


def claim_folder(folder: str, resuming: bool) -> int:
    """Make the run folder (a resumed run's own may exist), and lock it for this process's life: a second process is
    refused while the first runs, and the lock goes with the process however it ends. A folder left empty by a run
    stopped before it wrote anything is taken over. Returns the lock's file descriptor."""
    try:
        os.makedirs(folder)
    except FileExistsError:
        if not resuming and os.listdir(folder):
            checkpoint = os.path.join(folder, "checkpoint.pt")
            advice = "choose another --run-name"
            if os.path.isfile(checkpoint) and not has_finished(folder):
                advice += f", or continue that run with --resume {checkpoint}"
            raise UsageError(f"{folder} holds another run; {advice}") from None
    except OSError as e:
        raise UsageError(f"cannot make the run folder {folder} ({e.strerror})") from None
    lock = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        raise UsageError(f"{folder} is in use by another running process; wait for it to end") from None
    probe = os.path.join(folder, f".writable.{os.getpid()}")
    try:  # it must take a file before anything trains
        write_file(probe, b"")
        os.remove(probe)
    except (RunError, OSError) as e:
        os.close(lock)
        raise UsageError(f"the run folder {folder} is not writable ({e})") from None
    return lock


def start_wandb(args: Args, run_dir: str, wandb_id: Optional[str]):
    """A Weights & Biases run mirroring the TensorBoard log (wandb_id: the one a resumed run goes on in)."""
    wandb = importlib.import_module("wandb")
    wandb.tensorboard.patch(root_logdir=run_dir)  # names stay unprefixed, and no 10 s wait at exit
    try:
        return wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            id=wandb_id,
            config=asdict(args),
            name=args.run_name,
            sync_tensorboard=True,
            save_code=True,
            resume="allow" if wandb_id else None,
        )
    except Exception as e:
        wandb.tensorboard.unpatch()
        raise UsageError(
            f"--track: Weights & Biases did not start ({first_line(e)}); run `wandb login`, or set WANDB_MODE=offline"
        ) from None


def quiet_log_thread(hook: threading.ExceptHookArgs) -> None:
    """TensorBoard's writer thread re-raises a disk fault that Run.flush reports in one line: no traceback for it."""
    if type(hook.thread).__name__ == "_AsyncWriterThread" and issubclass(hook.exc_type, OSError):
        return
    threading.__excepthook__(hook)


# --- the run: everything around train()'s loop --------------------------------------------------------------
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
# Only a run started from the command line catches them (set below, under __main__): code that imports this file,
# a test session among it, stops on Ctrl-C and SIGTERM as any Python program does.
CATCH_SIGNALS = False


class Run:
    """One training run's machinery, reached from train() by one-line calls. Leaving its `with` block writes the result
    files however the run ended."""

    def __init__(self, args: Args, stop_at_step: Optional[int] = None):
        """Check the options and the env, read the checkpoint to resume from, join torchrun, seed the random streams,
        and claim the run folder."""
        check_args(args)
        self.args = args
        self.stop_at_step = stop_at_step
        self.resumed = load_checkpoint(args) if args.resume else None
        self.rank, self.world_size, self.device = init_distributed(args.cuda)
        self.main = self.rank == 0  # the rank that logs, shows progress and writes files
        if args.cuda and self.device.type != "cuda" and self.main:
            print("note: no CUDA GPU is available; running on the CPU (--no-cuda silences this)", file=sys.stderr)
        random.seed(args.seed + self.rank)  # each rank its own random streams; rank 0 (and a plain run) uses --seed
        np.random.seed(args.seed + self.rank)
        torch.manual_seed(args.seed + self.rank)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        self.episodes = []
        self.scalars = []
        self.update_times = []
        self.recent_ev = []
        self.warned = set()
        self.global_step = 0
        self.first_iteration = 1
        self.iteration = 0
        self.elapsed_before = 0.0
        self.next_line = 0
        self.envs = None
        self.writer = None
        self.wandb = None
        self.signal = None
        self.checkpoint_path = args.resume  # the last checkpoint on disk, offered in the closing line
        self.started = False
        self.interrupted = False
        self.updating = False
        self.closing = False
        self.drawn = False
        self.lock = None
        self.run_dir = os.path.join("runs", self.run_name())
        self.video_dir = os.path.join("videos", args.run_name) if args.capture_video and self.main else None
        self.handlers = {}
        if CATCH_SIGNALS and threading.current_thread() is threading.main_thread():
            self.handlers = {signum: signal.signal(signum, self.on_signal) for signum in SIGNAL_NAMES}

    def run_name(self) -> str:
        """Name the run (a default name ends in a random suffix) and claim its folder, this run's alone."""
        args = self.args
        name = args.run_name
        if name is not None and (os.path.basename(name) != name or name in ("", ".", "..")):
            raise UsageError(f"--run-name {name!r} is not a plain folder name; a run's files go to runs/<run_name>")
        if self.main and not name:
            name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}_{secrets.token_hex(4)}"
            name = name.replace("/", "-").replace(":", "-")
        if self.world_size > 1:
            names = [name]
            dist.broadcast_object_list(names, src=0)  # rank 0 names the run
            name = names[0]
        args.run_name = name
        if self.main:
            self.lock = claim_folder(os.path.join("runs", name), resuming=bool(args.resume))
        return name

    def __enter__(self) -> "Run":
        return self

    def start(
        self,
        agent: nn.Module,
        optimizer: torch.optim.Optimizer,
        envs: gym.vector.VectorEnv,
        obs: torch.Tensor,
        valid: np.ndarray,
        *carried: torch.Tensor,
    ) -> gym.vector.VectorEnv:
        """Resume from the checkpoint, or reset the envs; returns the envs. The last row of obs, valid and each carried
        buffer is what one rollout hands to the next (and checkpoints save): the first rollout starts there."""
        args = self.args
        ckpt = self.resumed
        restored = False
        if envs.metadata.get("autoreset_mode") != gym.vector.AutoresetMode.NEXT_STEP:  # else the final obs is lost
            raise UsageError(
                f"the vector env resets its envs in mode {envs.metadata.get('autoreset_mode')}; the loop "
                "handles only gymnasium's default, AutoresetMode.NEXT_STEP (build it without it)"
            )
        for p in agent.parameters() if self.world_size > 1 else []:
            dist.broadcast(p.data, src=0)  # every rank starts from rank 0's initialization
        if ckpt is not None:
            load_weights(agent, ckpt["model"], f"--resume {args.resume}")
            load_weights(optimizer, ckpt["optimizer"], f"--resume {args.resume}")
            mine = ckpt["ranks"][self.rank]
            for buffer, row in zip((obs, valid, *carried), mine["carried"]):
                buffer[-1] = row.numpy() if isinstance(buffer, np.ndarray) else row
            envs, restored = restore_rank(envs, mine["state"], ~valid[-1], args.async_envs)
            self.global_step = ckpt["global_step"]
            self.first_iteration = ckpt["iteration"] + 1
            self.episodes = [tuple(e) for e in ckpt["episodes"]]
            self.elapsed_before = ckpt["elapsed"]
        if ckpt is not None and not restored:
            self.say(
                f"note: {args.resume} holds no envs ({mine.get('new_episodes') or 'they could not be saved'}); "
                "they start new episodes"
            )
        if not restored:  # new episodes; where a checkpoint could not hold its envs, seeded apart from the first start
            # No two envs of the job share a seed: rank r's env i is seeded like env r * num_envs + i of one big run.
            obs[-1] = torch.as_tensor(envs.reset(seed=args.seed + self.rank * args.num_envs + self.global_step)[0])
            valid[-1] = True
            for buffer in carried:
                buffer[-1] = 0
        self.agent = agent
        self.optimizer = optimizer
        self.envs = envs
        self.buffers = (obs, valid, *carried)
        optimizer.found_inf = torch.zeros((), device=self.device)  # fused Adam skips its step while this is set
        if self.main:
            if args.track:  # Weights & Biases mirrors TensorBoard; a resumed run goes on in its own wandb run
                self.wandb = start_wandb(args, self.run_dir, ckpt["wandb_id"] if ckpt else None)
            # A resumed run hides what was logged after its checkpoint, so no step shows twice.
            purge_step = ckpt["global_step"] + 1 if ckpt else None
            threading.excepthook = quiet_log_thread
            self.writer = SummaryWriter(self.run_dir, purge_step=purge_step)
            if not ckpt:
                rows = "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
                self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + rows)
        self.start_time = time.time()
        self.last_checkpoint = self.start_time
        self.start_step = self.global_step
        self.done_step = self.global_step
        self.episodes_sent = len(self.episodes)
        self.started = True
        return envs

    def on_signal(self, signum, frame) -> None:
        # The first Ctrl-C or SIGTERM lets the update finish, then a checkpoint is written; a second one quits at once,
        # and so does one before training starts (the folder, with nothing in it yet, is removed). Once the run is over
        # (its results being written), a signal changes nothing.
        if self.closing:
            return
        if self.signal is not None or not self.started:
            raise KeyboardInterrupt(signum)  # main() exits with 128 + signum, as the signal itself would
        self.signal = signum
        self.say(
            f"warning: {SIGNAL_NAMES[signum]}: finishing this update, then writing a checkpoint "
            f"({SIGNAL_NAMES[signum]} again quits at once)"
        )

    def iterations(self):
        """The numbers of the updates still to run. After each: a checkpoint when one is due (--checkpoint-every,
        --checkpoint-minutes), and the end of the run after Ctrl-C or SIGTERM (with a checkpoint) or at stop_at_step."""
        args = self.args
        for iteration in range(self.first_iteration, args.num_iterations + 1):
            self.iteration = iteration
            started = time.time()
            yield iteration
            self.done_step = self.global_step
            self.updating = False
            self.update_times.append(time.time() - started)
            if args.compile and len(self.update_times) == 3:
                self.say(
                    "torch.compile: the first two updates took {:.1f} s and {:.1f} s (compiling), the third "
                    "{:.2f} s".format(*self.update_times)
                )
            every = args.checkpoint_every and iteration % args.checkpoint_every == 0
            minutes = args.checkpoint_minutes and time.time() - self.last_checkpoint >= 60 * args.checkpoint_minutes
            # A signal during the last update changes nothing: the run is complete. All ranks stop and checkpoint after
            # the same update (a signal reaches them at slightly different moments).
            stop = self.signal is not None and iteration < args.num_iterations
            due = bool(every or minutes)
            if self.world_size > 1:
                stop, due = (all_sum(torch.tensor([float(stop), float(due)], device=self.device)) > 0).tolist()
            if stop or due:
                self.checkpoint()
            if stop or (self.stop_at_step is not None and self.global_step >= self.stop_at_step):
                self.interrupted = stop
                return

    def record(self, info: dict) -> None:
        """Count one step of the vector env, and keep the episodes that ended in it: (step, time, return, length)."""
        self.global_step += self.args.num_envs * self.world_size
        if "_episode" in info:
            ended = info["_episode"]
            now = round(self.elapsed(), 3)
            returns = info["episode"]["r"][ended].tolist()
            lengths = info["episode"]["l"][ended].tolist()
            self.episodes += [(self.global_step, now, r, n) for r, n in zip(returns, lengths)]

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start_time

    def check_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """A NaN or infinite loss stops the run without its optimizer step: fused Adam skips every step while found_inf
        is set, and log_update() stops the run at the update's end (no host sync per minibatch)."""
        self.updating = True  # from here on the parameters are no longer those of the last completed update
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        torch.maximum(self.optimizer.found_inf, bad.float(), out=self.optimizer.found_inf)

    def log_update(self, diagnostics: dict[str, torch.Tensor], explained_var: torch.Tensor, epochs: int) -> None:
        """Log an update's diagnostics (averaged over the ranks; one copy to the host), watch PPO's health, show
        progress. TensorBoard gets them in bursts of 50 updates: one at a time, its thread slowed a fast run by 30%."""
        if self.world_size > 1:  # rank 0 logs the episodes of every rank
            everyone = [None] * self.world_size if self.main else None
            dist.gather_object(self.episodes[self.episodes_sent :], everyone, dst=0)
            self.episodes += [e for other in (everyone[1:] if self.main else []) for e in other]
            self.episodes_sent = len(self.episodes)
        means = all_sum(torch.stack(list(diagnostics.values()))) / self.world_size
        values = torch.cat([means, explained_var, self.optimizer.found_inf.view(1)]).tolist()  # the one host copy
        if values[-1]:
            raise RunError(
                f"the loss became nan or infinite in update {self.iteration} (step {self.global_step}); its "
                "optimizer step and the update's later ones were skipped and training stopped. Lower "
                f"--learning-rate or --max-grad-norm; the last checkpoint, if any, stays in {self.run_dir}"
            )
        step = self.global_step
        n = len(diagnostics)
        recent = self.episodes[-20:]
        sps = (step - self.start_step) / (time.time() - self.start_time)
        total = self.args.total_timesteps
        ret = np.nan
        metrics = {
            **{f"losses/{k}": v for k, v in zip(diagnostics, values)},
            "losses/explained_variance": values[n],
            "losses/epochs": epochs,
            "charts/learning_rate": self.optimizer.param_groups[0]["lr"],
            "charts/SPS": sps,
        }
        if recent:
            ret = float(np.mean([e[2] for e in recent]))
            metrics["charts/episodic_return"] = ret
            metrics["charts/episodic_length"] = float(np.mean([e[3] for e in recent]))
        if not self.main:
            return
        self.scalars.extend((k, v, step) for k, v in metrics.items())
        if len(self.scalars) >= 50 * len(metrics):
            self.flush()
        self.check_health(metrics, values[n + 1] > 0)
        live = sys.stderr.isatty()  # a line redrawn in place in a terminal, else (logs) a line every 5% of the steps
        if self.args.progress and (live or step >= self.next_line):
            eta = (total - step) / max(sps, 1e-9)
            line = f"step {step:,}/{total:,} ({100 * step / total:.0f}%)  {sps:,.0f} steps/s  return {ret:.1f}  "
            line += f"ETA {eta:.0f}s"
            if live:
                print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)
            else:
                print(line, file=sys.stderr, flush=True)
            self.next_line = step + max(total // 20, 1)
            self.drawn = live

    def check_health(self, metrics: dict[str, float], returns_vary: bool) -> None:
        """PPO's instability signals, each a warning line the first time it goes bad."""
        # Explained variance is noisy from one batch to the next, and says little while returns barely vary.
        self.recent_ev.append(metrics["losses/explained_variance"] if returns_vary else math.nan)
        self.recent_ev = self.recent_ev[-20:]
        ev = float(np.nanmean(self.recent_ev)) if np.isfinite(self.recent_ev).sum() >= 10 else 0.0
        kl = metrics["losses/approx_kl"]
        ess = metrics["losses/ess"]
        late = self.iteration > self.args.num_iterations // 2
        kl_limit = 2 * self.args.target_kl if self.args.target_kl is not None else 0.05  # far above target (~0.01)
        warnings = {
            "kl": (
                kl > kl_limit,
                f"approx KL {kl:.3f} > {kl_limit:.3f}: the policy moves far per update; lower --learning-rate or "
                "--update-epochs, or set --target-kl",
            ),
            "ev": (
                late and ev < 0,
                f"explained variance averaged {ev:.2f} < 0 over the last 20 updates: the critic predicts returns worse "
                "than their mean, so advantages are mostly noise",
            ),
            "ess": (
                ess < 0.5,
                f"effective sample size fell to {ess:.2f} of the batch: a few samples dominate the gradient; lower "
                "--learning-rate or --clip-coef",
            ),
        }
        for kind, (bad, message) in warnings.items():
            if bad and kind not in self.warned:
                self.warned.add(kind)
                self.say(f"warning: {message} (at step {self.global_step}; shown once)")

    def say(self, message: str) -> None:
        if self.main:
            print("\n" * self.drawn + message, file=sys.stderr, flush=True)  # below the progress line, if drawn
            self.drawn = False

    def flush(self) -> None:
        try:
            for tag, value, step in self.scalars:
                self.writer.add_scalar(tag, value, step)
            self.scalars.clear()
            self.writer.flush()
        except OSError as e:
            raise RunError(f"cannot write the TensorBoard log in {self.run_dir} ({e.strerror})") from None

    def checkpoint(self, after_crash: bool = False) -> None:
        """Write runs/<run>/checkpoint.pt, all a resumed run needs to go on as an uninterrupted one would, as tensors,
        numbers and bytes (the envs, pickled). After a crash: the last completed update, without envs (new episodes)."""
        iteration = self.iteration - 1 if after_crash else self.iteration
        step = self.done_step if after_crash else self.global_step
        mine = rank_state(self.envs, not after_crash)
        mine["carried"] = [torch.as_tensor(b[-1]).cpu().clone() for b in self.buffers]
        ranks = [mine]
        if self.world_size > 1:  # parameters and Adam are the same on every rank; envs and random streams are not
            ranks = [None] * self.world_size if self.main else None
            dist.gather_object(mine, ranks, dst=0)
        self.last_checkpoint = time.time()
        if self.main:
            self.flush()  # every scalar up to this update is on disk, so a crash now loses none of them
            path = os.path.join(self.run_dir, "checkpoint.pt")
            write_file(
                path,
                {
                    "family": FAMILY,
                    "script": SCRIPT,
                    "format": CHECKPOINT_FORMAT,
                    "args": asdict(self.args),
                    "iteration": iteration,
                    "global_step": step,
                    "model": self.agent.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "env_stats": env_stats(self.envs),
                    "ranks": ranks,
                    "episodes": [e for e in self.episodes if e[0] <= step],
                    "elapsed": self.elapsed(),
                    "wandb_id": self.wandb.id if self.wandb else None,
                },
            )
            self.checkpoint_path = path  # only once it is on disk: the closing line offers it
            if ranks[0]["new_episodes"] and not after_crash and "envs" not in self.warned:
                self.warned.add("envs")
                self.say(
                    f"note: checkpoints hold no envs ({ranks[0]['new_episodes']}); a resumed run starts new episodes"
                )

    def result(self, agent: nn.Module) -> dict:
        """Save the trained agent (with --save-model), and what train() returns."""
        self.closing = True
        if self.args.save_model and not self.interrupted and self.main:
            # The env statistics belong to the model: without them the policy would see other inputs.
            write_file(
                os.path.join(self.run_dir, "agent.pt"),
                {
                    "family": FAMILY,
                    "script": SCRIPT,
                    "args": asdict(self.args),
                    "model": agent.state_dict(),
                    "env_stats": env_stats(self.envs),
                },
            )
        episodes = {
            key: [e[i] for e in self.episodes] for i, key in enumerate(("steps", "times", "returns", "lengths"))
        }
        return {
            "agent": agent,
            "run_dir": self.run_dir,
            "episodes": episodes,
            "global_step": self.global_step,
            "interrupted": self.interrupted,
            "signal": self.signal,
            "env_stats": env_stats(self.envs),
        }

    def __exit__(self, kind, error, trace) -> None:
        self.closing = True
        memory = isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(error)
        unexpected = isinstance(error, Exception) and not isinstance(error, (UsageError, RunError)) and not memory
        if unexpected:
            traceback.print_exception(kind, error, trace)
        errors_shown = {str(error)}
        try:
            if self.main and self.writer is not None:
                # A crash outside an update leaves the last completed one intact: keep it (under torchrun the other
                # ranks wait for this one, and the last checkpoint stands).
                if (
                    isinstance(error, Exception)
                    and not self.updating
                    and self.iteration > self.first_iteration
                    and self.world_size == 1
                ):
                    with contextlib.suppress(RunError):  # a disk fault leaves the last good checkpoint in place
                        self.checkpoint(after_crash=True)
                self.say(self.finish(error))  # first: a fault of the logs below cannot lose the result files
                self.flush()
                self.writer.close()
                if self.wandb is not None:
                    self.wandb.finish()
                    sys.modules["wandb"].tensorboard.unpatch()  # the next run in this process patches its own folder
            elif self.main and not self.args.resume:
                shutil.rmtree(self.run_dir, ignore_errors=True)  # nothing started: no folder left behind
        except RunError as e:  # a disk fault while writing them
            if error is None:
                raise
            if str(e) not in errors_shown:  # main() shows the run's own error
                print(f"error: {e}", file=sys.stderr)
        finally:
            with contextlib.suppress(Exception):  # an env's process that died with the run: nothing left to close
                self.envs.close()
            if self.world_size > 1:
                if error is None:
                    dist.barrier()  # no rank tears down the process group while another still uses it
                dist.destroy_process_group()
            for signum, handler in self.handlers.items():
                signal.signal(signum, handler)
            threading.excepthook = threading.__excepthook__
            if self.lock is not None:
                os.close(self.lock)  # the run folder is free for a resume
        if memory:
            sizes = "--lstm-hidden-size, --num-envs or --num-steps" if self.args.lstm else "--num-envs or --num-steps"
            raise RunError(f"out of memory ({first_line(error)}); lower {sizes}, or raise --num-minibatches") from None
        if unexpected:
            raise RunError(f"training stopped by {first_line(error)} (traceback above)") from None

    def finish(self, error: Optional[BaseException]) -> str:
        """Every finished episode to episodes.csv and the run's totals to summary.json (plain files for a spreadsheet
        or the benchmark); returns the run's closing line."""
        args = self.args
        elapsed = self.elapsed()
        step = self.global_step
        returns = [e[2] for e in self.episodes]
        rows = [("global_step", "time_s", "return", "length"), *self.episodes]
        csv = "".join(f"{s},{t},{r},{n}\n" for s, t, r, n in rows)
        write_file(os.path.join(self.run_dir, "episodes.csv"), csv.encode())
        total = args.num_iterations * args.batch_size * args.world_size
        finished = error is None and not self.interrupted and step >= total
        final = float(np.mean(returns[-100:])) if returns else None
        sps = round(step / max(elapsed, 1e-9), 1)
        write_file(
            os.path.join(self.run_dir, "summary.json"),
            json.dumps(
                {
                    "script": SCRIPT,
                    "env_id": args.env_id,
                    "seed": args.seed,
                    "global_step": step,
                    "total_timesteps": args.total_timesteps,
                    "finished": finished,
                    "time_s": round(elapsed, 3),
                    "sps": sps,
                    "episodes": len(returns),
                    "final_return": final,
                },
                indent=1,
            ).encode(),
        )
        if finished:
            head = "finished"
        elif isinstance(error, Exception):
            head = "stopped by an error"
        elif self.signal:
            head = f"stopped by {SIGNAL_NAMES.get(self.signal, 'a signal')}"
        else:
            head = "stopped"
        if final is None:
            ended = "no episode finished"
        else:
            ended = f"final return {final:.2f} (mean of the last {min(100, len(returns))} episodes)"
        line = (
            f"{head}: {step:,} of {args.total_timesteps:,} steps in {elapsed:.0f} s ({sps:,.0f} steps/s), {ended}; "
            f"files in {self.run_dir} (tensorboard --logdir runs)"
        )
        if not finished and self.checkpoint_path and os.path.isfile(self.checkpoint_path):
            command = f"python {SCRIPT}" if self.world_size == 1 else "the same torchrun command with"
            line += f"\ncontinue from the last checkpoint with: {command} --resume {self.checkpoint_path}"
        return line


# --- evaluation of a saved agent, and the command line ------------------------------------------------------
EVAL_SEED_OFFSET = 1_000_000_000  # evaluation episodes are seeded apart from every training env
# What --eval-checkpoint takes; the saved agent brings every other option. --env-id only names the saved one, so that
# its module (module:Env-v0) is imported because the user said so, never because a shared file did.
EVAL_OPTIONS = {
    "eval_checkpoint",
    "eval_episodes",
    "eval_seed",
    "eval_deterministic",
    "capture_video",
    "env_id",
    "progress",
    "cuda",  # --no-cuda only: evaluation plays on the CPU
}


def evaluate(
    path: str,
    episodes: int,
    seed: Optional[int] = None,
    deterministic: bool = False,
    video_dir: Optional[str] = None,
    env_id: Optional[str] = None,
) -> tuple[np.ndarray, int]:
    """Play `episodes` episodes with a saved agent or checkpoint (none of its code runs): their returns and the env
    seed, EVAL_SEED_OFFSET + the training seed by default. deterministic: the most likely action, not a sample.
    env_id: the env as the user named it, which alone may import a module (module:Env-v0)."""
    what = f"--eval-checkpoint {path}"
    data = load_file(path, what.split()[0])
    saved = saved_args(data, what)
    if env_id is not None and env_id != saved.env_id:
        raise UsageError(f"--env-id {env_id}: {what} was trained on {saved.env_id}; drop --env-id, or name that one")
    if ":" in saved.env_id and env_id is None:
        module = saved.env_id.split(":")[0]
        raise UsageError(
            f"{what} was trained on --env-id {saved.env_id}, which imports the module {module}; a file never imports "
            f"code by itself: pass --env-id {saved.env_id} to import it"
        )
    args = dataclasses.replace(saved, async_envs=False)  # one env: no process of its own
    check_args(args)  # the env's module imports, or one line says why not
    envs = make_envs(args, 1, video_dir)
    load_env_stats(envs, data.get("env_stats", {}))
    lstm_size = args.lstm_hidden_size if args.lstm else 0
    with torch.device("meta"):  # the network the options describe, without memory: it must fit the weights first
        shell = Agent(envs, lstm_size)
    check_shapes(shell, data["model"], what)
    agent = Agent(envs, lstm_size)
    load_weights(agent, data["model"], what)
    seed = EVAL_SEED_OFFSET + args.seed if seed is None else seed
    torch.manual_seed(seed)
    returns = []
    next_obs, info = envs.reset(seed=seed)
    state = torch.zeros((1, agent.state_size))  # an LSTM's state, carried from step to step
    goes_on = np.ones(1, bool)
    with torch.inference_mode():
        while len(returns) < episodes:
            action, state = agent.act(torch.as_tensor(next_obs, dtype=OBS_DTYPE), state, goes_on, deterministic)
            before = info
            next_obs, _, terminated, truncated, info = envs.step(action.numpy())
            goes_on = ~(terminated | truncated)
            state[torch.from_numpy(life_lost(before, info))] = 0  # learning's episode ended with a life (Atari)
            if "_episode" in info:
                returns.extend(info["episode"]["r"][info["_episode"]].tolist())
    envs.close()
    return np.array(returns[:episodes]), seed


def main(argv: Optional[list[str]] = None) -> int:
    """Train, resume (--resume) or play a saved agent (--eval-checkpoint) from the command line; the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        paths = [b for a, b in zip(argv, argv[1:]) if a == "--resume"] + [a[9:] for a in argv if a[:9] == "--resume="]
        if len(paths) > 1:
            raise UsageError(f"--resume is given {len(paths)} times ({', '.join(paths)}); give it once")
        # With --resume, the checkpoint's options are the defaults: only what is given again changes. --help reads none.
        default = None
        if paths and not {"-h", "--help"} & set(argv):
            default = saved_args(load_file(paths[0], "--resume"), f"--resume {paths[0]}")
        args = tyro.cli(Args, args=argv, default=default, description=__doc__.split("\n")[0])
        if args.eval_checkpoint:
            if args.world_size > 1:
                raise UsageError("--eval-checkpoint plays in one process; run it with python, not torchrun")
            unused = sorted(given_options(argv) - EVAL_OPTIONS)
            if args.cuda and "cuda" in given_options(argv):
                unused.insert(0, "cuda")
            if unused:
                raise UsageError(
                    f"{flag(unused[0])} is not used by --eval-checkpoint, which plays the saved agent with the "
                    "options it was trained with; drop it"
                )
            check_args(args)
            folder = os.path.basename(os.path.dirname(os.path.abspath(args.eval_checkpoint)))
            video_dir = os.path.join("videos", "eval-" + folder) if args.capture_video else None
            env_id = args.env_id if "env_id" in given_options(argv) else None
            returns, seed = evaluate(
                args.eval_checkpoint, args.eval_episodes, args.eval_seed, args.eval_deterministic, video_dir, env_id
            )
            mode = "deterministic actions" if args.eval_deterministic else "actions sampled from the policy"
            print(
                f"{len(returns)} episodes ({mode}, env seed {seed}): return {returns.mean():.2f} +- "
                f"{returns.std():.2f} (min {returns.min():.1f}, max {returns.max():.1f})"
            )
            return 0
        result = train(args)
    except (UsageError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        return 128 + (e.args[0] if e.args else signal.SIGINT)
    except BrokenPipeError:  # the reader of the output left (--help | head): nothing more to say, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 128 + result["signal"] if result["interrupted"] else 0


def given_options(argv: list[str]) -> set[str]:
    """The options named on the command line, as Args fields (--no-cuda names cuda)."""
    names = set()
    for word in argv:
        if not word.startswith("--"):
            continue
        name = word[2:].split("=")[0].replace("-", "_")
        if name not in Args.__dataclass_fields__:
            name = name.removeprefix("no_")
        names.add(name)
    return names


def exit_with(code: int) -> None:
    """End the process with this status; a signal from here on changes nothing. A torchrun rank skips the teardown,
    where Gloo's threads aborted one two-rank run in sixty after every file was written, failing the whole job."""
    for signum in SIGNAL_NAMES:
        signal.signal(signum, signal.SIG_IGN)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    CATCH_SIGNALS = True
    exit_with(main())
