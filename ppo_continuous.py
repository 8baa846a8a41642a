"""PPO for continuous actions (MuJoCo and any Box-action env), in one file.

    python ppo_continuous.py                        # HalfCheetah-v5, 1M steps, logs in runs/
    python ppo_continuous.py --env-id Hopper-v5 --seed 2 --save-model
    python ppo_continuous.py --eval-checkpoint runs/<run>/agent.pt --eval-episodes 10
    python ppo_continuous.py --help                 # every option

Part A, from the top, is PPO: the options (Args), the environments, the network (Agent), GAE
(compute_gae), the loss (ppo_loss) and the training loop (train). Part B, below the banner, runs the
experiment: option checks, torchrun, resume, logs, progress, checkpoints, signals, evaluation, main().
Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347); the implementation
details follow Huang et al. 2022, "The 37 Implementation Details of PPO" (ICLR blog track), including
its nine for continuous control: Gaussian policy with state-independent log-std, actions clipped only
on the way to the env, observation normalization and clipping, reward scaling and clipping.
"""

import copy
import csv
import ctypes.util
import dataclasses
import difflib
import functools
import importlib
import json
import math
import multiprocessing
import os
import pickle
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import cloudpickle  # comes with gymnasium; pickles the vector env (with its env factories) for exact resume
import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

SCRIPT = "ppo_continuous"
# MuJoCo renders through EGL on a machine without a display (osmesa is rarely installed). Only where
# libEGL exists: asking for EGL without it makes `import mujoco` itself fail, video or not.
if not os.environ.get("DISPLAY") and ctypes.util.find_library("EGL"):
    os.environ.setdefault("MUJOCO_GL", "egl")


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = SCRIPT
    """name of the experiment, part of the run name"""
    seed: int = 1
    """random seed; env i is seeded with seed + i (under torchrun rank r: seed + r, its envs seed + r * num_envs + i)"""
    run_name: Optional[str] = None
    """folder name under runs/ and videos/ (default: <env_id>__<exp_name>__<seed>__<unix time>)"""
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
    """record episodes of env 0 to videos/<run_name>/ (headless MuJoCo renders with EGL)"""
    progress: bool = True
    """show a live progress bar (plain progress lines when output is not a terminal)"""
    save_model: bool = False
    """save the trained agent and its options to runs/<run_name>/agent.pt"""
    checkpoint_every: int = 0
    """write runs/<run_name>/checkpoint.pt every this many updates (0: off; Ctrl-C and SIGTERM always write one)"""
    checkpoint_minutes: float = 10.0
    """also write it when this many minutes passed since the last one (0: off): a killed run loses at most that"""
    resume: Optional[str] = None
    """continue training from this checkpoint file; its options are the defaults"""
    eval_checkpoint: Optional[str] = None
    """evaluate this saved agent or checkpoint instead of training, then exit"""
    eval_episodes: int = 10
    """episodes to play with --eval-checkpoint"""
    eval_seed: Optional[int] = None
    """env seed of the evaluation (default: 1,000,000,000 + the training seed, apart from every training env's)"""
    eval_deterministic: bool = False
    """evaluate with the most likely action (the Gaussian's mean) instead of actions sampled from the policy"""

    # --- algorithm ---
    env_id: str = "HalfCheetah-v5"
    """gymnasium id of an env with Box actions and vector observations (module:Env-v0 imports module first)"""
    total_timesteps: int = 1_000_000
    """environment steps to train for, summed over all envs (and all ranks under torchrun)"""
    learning_rate: float = 3e-4
    """Adam step size at the start of training"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over training"""
    num_envs: int = 1
    """parallel environments per process (under torchrun each rank runs this many)"""
    async_envs: bool = False
    """step each env in a process of its own (gymnasium's AsyncVectorEnv): pays for slow envs, with cores to spare"""
    num_steps: int = 2048
    """steps per env in each rollout (batch = num_envs * num_steps transitions)"""
    gamma: float = 0.99
    """discount factor, in [0, 1]"""
    gae_lambda: float = 0.95
    """GAE lambda, in [0, 1]: 0 gives one-step TD advantages, 1 Monte Carlo returns minus values"""
    num_minibatches: int = 32
    """minibatches per epoch; must divide the batch"""
    update_epochs: int = 10
    """passes (K epochs) over each batch"""
    norm_adv: bool = True
    """normalize advantages to zero mean, unit std within each minibatch"""
    clip_coef: float = 0.2
    """surrogate clipping: the ratio is kept in [1 - clip_coef, 1 + clip_coef]"""
    clip_vloss: bool = True
    """clip the value update around the old value by clip_coef as well"""
    ent_coef: float = 0.0
    """weight of the entropy bonus"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    max_grad_norm: float = 0.5
    """clip the global gradient norm to this"""
    target_kl: Optional[float] = None
    """stop the update epochs early when the mean approx KL of an epoch exceeds this (default: off)"""
    clip_obs: float = 10.0
    """normalized observations are clipped to [-clip_obs, clip_obs]"""
    clip_reward: float = 10.0
    """scaled rewards are clipped to [-clip_reward, clip_reward]"""

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


# ----------------------------------------------------------------------------------------------------
# Environments
# ----------------------------------------------------------------------------------------------------
def make_env(env_id: str, idx: int, video_dir: Optional[str] = None) -> Callable[[], gym.Env]:
    """The recipe for env number idx of a vector env.

    The one place for a wrapper of your own: every env of every run (training, video, evaluation) is made here.
    """

    def thunk():
        if video_dir is not None and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array")
            try:
                env.reset(seed=0)
                env.render()
            except Exception as e:  # no EGL/GPU driver, no display: train on without video
                print(f"warning: --capture-video: this env cannot render here ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); training goes on without video", file=sys.stderr)
                return gym.make(env_id)
            env = gym.wrappers.RecordVideo(env, video_dir, disable_logger=True)
        else:
            env = gym.make(env_id)
        return env

    return thunk


def make_envs(args: Args, num_envs: int, video_dir: Optional[str] = None) -> gym.vector.VectorEnv:
    """num_envs envs stepped as one batch (detail 1), with episode statistics, action clipping and
    observation and reward normalization.

    Every gymnasium 1.x vector env autoresets on the NEXT step: the step after an episode ends returns
    the first observation of the next episode with reward 0 and ignores the action. The training loop
    marks those steps as not-a-transition (`valid`) and never trains on them; the observation returned
    when an episode ends is then the true final observation, which is what truncation needs.
    """
    # One after another in this process, or each in a process of its own (--async-envs).
    envs = vector_env([make_env(args.env_id, i, video_dir) for i in range(num_envs)], args.async_envs)
    # Statistics first: reported returns are the env's own rewards, before any scaling.
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    if not isinstance(envs.single_action_space, gym.spaces.Box) or \
            not isinstance(envs.single_observation_space, gym.spaces.Box):
        return envs  # check_spaces says why this script cannot train it
    # The agent stores and trains on the sampled, unclipped action; only the copy sent to the env is
    # clipped to the bounds (details 4-5). Unbounded dimensions pass through unchanged. (The same as
    # gymnasium's ClipAction, which clips env by env and costs several times more per step.)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    envs = gym.wrappers.vector.TransformAction(envs, lambda action: np.clip(action, low, high))
    # Running mean/std of observations, shared by all envs (detail 6), then clipped (detail 7).
    envs = gym.wrappers.vector.NormalizeObservation(envs)
    envs = gym.wrappers.vector.TransformObservation(envs, lambda obs: np.clip(obs, -args.clip_obs, args.clip_obs))
    # Rewards divided by the running std of the discounted return (details 8-9), then clipped.
    envs = gym.wrappers.vector.NormalizeReward(envs, gamma=args.gamma)
    return gym.wrappers.vector.TransformReward(envs, lambda reward: np.clip(reward, -args.clip_reward,
                                                                             args.clip_reward))


# ----------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------
def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    # Orthogonal init, gain sqrt(2) for hidden layers (implementation detail 2).
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


# The network reads observations as float32 vectors: so the rollout buffer and evaluation hold them.
OBS_DTYPE = torch.float32


class Agent(nn.Module):
    """Separate actor and critic MLPs (64-64 tanh) and a diagonal Gaussian policy whose log-std is a
    learned vector that does not depend on the state (detail 2 for continuous control).

    What train() and evaluate() call, the same in all three scripts (keep it when you swap the network):
        act(obs, deterministic=False) -> action     a sample of the policy, or its most likely action
        get_value(obs) -> value                     the critic's V(obs)
        get_action_and_value(obs, action=None) -> (action, log-prob, entropy, value)
            under the current parameters, for the given actions (or for sampled ones when action is None)
    obs is a batch (B, *observation shape); the actions are (B, action dims), the rest (B,).
    """

    def __init__(self, envs: gym.vector.VectorEnv):
        super().__init__()
        obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        # A 0.01 gain makes the first policy's means nearly 0, so early actions are set by the std.
        self.actor_mean = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, act_dim), std=0.01),
        )
        self.actor_logstd = nn.Parameter(torch.zeros(1, act_dim))

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """The rollout's only forward pass. Its log-probs and values are computed afterwards in one batched
        call (the parameters do not change during a rollout)."""
        mean = self.actor_mean(obs)
        return mean if deterministic else mean + self.actor_logstd.exp() * torch.randn_like(mean)

    def get_action_and_value(self, obs: torch.Tensor, action: Optional[torch.Tensor] = None):
        mean = self.actor_mean(obs)
        logstd = self.actor_logstd.expand_as(mean)
        if action is None:  # a sample is a fixed point: its log-prob's gradient must not flow through it
            action = (mean + logstd.exp() * torch.randn_like(mean)).detach()
        # Normal log-density written out (cheaper than a distribution object); the action dimensions
        # are independent, so log-probs and entropies add up over them.
        logp = (-0.5 * ((action - mean) / logstd.exp()) ** 2 - logstd - 0.5 * math.log(2 * math.pi)).sum(-1)
        entropy = (0.5 + 0.5 * math.log(2 * math.pi) + logstd).sum(-1)
        return action, logp, entropy, self.get_value(obs)


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
        advantages = normalize(advantages)

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


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
def train(args: Args, stop_at_step: Optional[int] = None) -> dict:
    """Train PPO; returns the agent, its run folder and the episodes seen ({"returns", "lengths", "steps", "times"}).

    stop_at_step ends training early at that global step while the learning-rate schedule still runs
    over args.total_timesteps (to look at the first part of a full-length run).
    """
    with Run(args, stop_at_step) as run:  # checks the options, joins torchrun, seeds the random streams
        device = run.device
        envs = make_envs(args, args.num_envs, run.video_dir)
        check_spaces(args.env_id, envs)
        agent = Agent(envs).to(device)
        # Listed once: walking the module tree costs about 0.1 ms, paid twice per minibatch otherwise.
        params = list(agent.parameters())
        # Adam eps 1e-5 (detail 3) instead of torch's 1e-8; the fused kernel does the whole step in one call.
        optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5, fused=True)
        loss_fn = ppo_loss
        if args.compile:  # torch.compile: the agent's forward passes and the loss, with their backward
            agent.act, loss_fn = torch.compile(agent.act), torch.compile(ppo_loss)
            agent.get_action_and_value = torch.compile(agent.get_action_and_value)

        # Rollout storage. obs and valid have T + 1 rows: the last is where the next rollout starts, and the
        # observation after the last step is also what the rollout's last value bootstraps from.
        T, N = args.num_steps, args.num_envs
        obs = torch.zeros((T + 1, N, *envs.single_observation_space.shape), dtype=OBS_DTYPE, device=device)
        actions = torch.zeros((T, N, *envs.single_action_space.shape), device=device)
        # Env outputs stay in numpy during the rollout; they become tensors once per rollout, not once per step.
        rewards = np.zeros((T, N), dtype=np.float32)
        terminations = np.zeros((T, N), dtype=np.float32)
        dones = np.zeros((T, N), dtype=np.float32)
        valid = np.zeros((T + 1, N), dtype=bool)  # False where a step only reset an env whose episode had ended
        envs = run.start(agent, optimizer, envs, obs, valid)  # resumes from the checkpoint, or resets the envs
        normalization = SharedStatistics(envs, resumed=run.resumed is not None)

        for iteration in run.iterations():  # between updates: checkpoints, and the stop on Ctrl-C or SIGTERM
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (iteration - 1.0) / args.num_iterations)

            # --- rollout: the actor alone, no autograd bookkeeping ---
            obs[0], valid[0] = obs[T], valid[T]
            with torch.inference_mode():
                for step in range(T):
                    action = agent.act(obs[step])
                    actions[step] = action
                    # The env gets a clipped copy (ClipAction); the buffer keeps the sampled action.
                    # On the CPU .cpu() is free; with a GPU this is the one unavoidable copy per step.
                    next_obs, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
                    rewards[step], terminations[step] = reward, terminated
                    dones[step] = done = np.logical_or(terminated, truncated)
                    # The step after an episode ends only resets that env: not a transition to learn from.
                    valid[step + 1] = ~done
                    obs[step + 1] = torch.as_tensor(next_obs, device=device)
                    run.record(info)  # counts the steps; keeps the returns of the episodes that ended
            normalization.merge()  # under torchrun: every rank normalizes with the statistics of all ranks' data

            # --- the old policy's log-probs and values, and advantages, in one batched pass ---
            # The rollout's host arrays go to the device before anything else is queued there: a copy from the
            # host waits for the device's queue, which is empty now.
            b_inds = torch.from_numpy(np.flatnonzero(valid[:T])).to(device)  # the transitions, found on the host
            run.check_batch(len(b_inds))
            rewards_t, terminations_t, dones_t = (torch.from_numpy(x).to(device)
                                                  for x in (rewards, terminations, dones))
            b_obs, b_actions = obs[:-1].flatten(0, 1), actions.flatten(0, 1)
            with torch.no_grad():
                _, b_logprobs, _, b_values = agent.get_action_and_value(b_obs, b_actions)
                values = torch.cat([b_values, agent.get_value(obs[T])]).view(T + 1, N)
                advantages = compute_gae(rewards_t, values, terminations_t, dones_t, args.gamma, args.gae_lambda)
                b_advantages = advantages.reshape(-1)
                b_returns = b_advantages + b_values

            # --- K epochs of minibatch Adam on the batch ---
            mb_stats = []
            for epoch in range(args.update_epochs):
                perm = b_inds[torch.randperm(len(b_inds), device=device)]
                logratios = []
                for mb in torch.tensor_split(perm, args.num_minibatches):
                    _, newlogp, entropy, newvalue = agent.get_action_and_value(b_obs[mb], b_actions[mb])
                    loss, stats = loss_fn(newlogp, b_logprobs[mb], b_advantages[mb], newvalue, b_values[mb],
                                          b_returns[mb], entropy, clip_coef=args.clip_coef, vf_coef=args.vf_coef,
                                          ent_coef=args.ent_coef, norm_adv=args.norm_adv, clip_vloss=args.clip_vloss)
                    optimizer.zero_grad()
                    loss.backward()
                    average_gradients(params)  # under torchrun: the mean over the ranks, before clipping
                    grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                    run.check_finite(loss, grad_norm)  # a NaN or infinite loss stops the run before its step
                    optimizer.step()
                    logratios.append(stats.pop("logratio"))
                    mb_stats.append(torch.stack([*stats.values(), grad_norm]))
                shift = policy_shift(torch.cat(logratios), args.clip_coef)
                if args.target_kl is not None and shift["approx_kl"] > args.target_kl:
                    break  # early stop (detail 12): the policy already moved as far as we allow

            # --- diagnostics: losses averaged over the minibatches, the policy's shift over the last epoch ---
            diagnostics = {**dict(zip([*stats, "grad_norm"], torch.stack(mb_stats).mean(0))), **shift}
            run.log_update(diagnostics, explained_variance(b_values[b_inds], b_returns[b_inds]), epochs=epoch + 1)
        return run.result(agent)


# ----------------------------------------------------------------------------------------------------
# Helpers: advantage normalization (ppo_loss), how far the policy moved (train)
# ----------------------------------------------------------------------------------------------------
def normalize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit std over the whole minibatch (detail 7), one formula for any number of processes:
    under torchrun the minibatch is the union of every rank's part, and its mean and std come from the
    count, sum and sum of squares added up over the ranks (all_sum); a plain run is the one-rank case."""
    sums = all_sum(torch.stack([x.new_tensor(x.numel()), x.sum(), (x**2).sum()]).double())
    n, mean = sums[0], sums[1] / sums[0]
    std = ((sums[2] - n * mean**2) / (n - 1)).clamp_min(0).sqrt()  # unbiased, as torch.std
    return ((x - mean) / (std + 1e-8)).to(x.dtype)


def policy_shift(logratio: torch.Tensor, clip_coef: float) -> dict[str, torch.Tensor]:
    """How far the new policy moved from the one that collected the batch, from log(pi_new / pi_old).

    Means over every rank's samples under torchrun, so that all ranks take the same target-KL decision.
    """
    with torch.no_grad():
        w = logratio.exp()
        sums = all_sum(torch.stack([
            logratio.new_tensor(logratio.numel()),
            # KL(old || new) estimators, http://joschu.net/blog/kl-approx.html: the naive -log r and the
            # unbiased, always non-negative (r - 1) - log r.
            -logratio.sum(), ((w - 1) - logratio).sum(),
            ((w - 1.0).abs() > clip_coef).float().sum(),
            w.sum(), (w**2).sum(),
        ]))
        n = sums[0]
        return {"old_approx_kl": sums[1] / n, "approx_kl": sums[2] / n, "clipfrac": sums[3] / n,
                # Effective sample size of the importance weights as a fraction of the batch: 1 while
                # new == old, falling toward 0 as a few samples dominate the gradient estimate.
                "ess": sums[4] ** 2 / (n * sums[5])}


# ----------------------------------------------------------------------------------------------------
# What Part B needs of this script's envs: checks, checkpoints, the statistics saved with the agent
# ----------------------------------------------------------------------------------------------------
def check_spaces(env_id: str, envs: gym.vector.VectorEnv) -> None:
    """Refuse, in one line, an env whose spaces this script cannot learn."""
    act, obs = envs.unwrapped.single_action_space, envs.single_observation_space
    if isinstance(act, (gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)):
        raise UsageError(f"--env-id {env_id} has discrete actions ({act}); train it with ppo_discrete.py")
    if not isinstance(act, gym.spaces.Box) or len(act.shape) != 1:
        raise UsageError(f"--env-id {env_id} has a {act} action space; this script needs a flat Box of continuous "
                         "actions")
    if not isinstance(obs, gym.spaces.Box):
        raise UsageError(f"--env-id {env_id} has a {type(obs).__name__} observation space; this script needs a vector "
                         "(Box) observation (wrap the env with gymnasium.wrappers.FlattenObservation in make_env)")
    if len(obs.shape) != 1:
        raise UsageError(f"--env-id {env_id} has image-like observations of shape {obs.shape}; this script needs "
                         "vector observations (ppo_atari.py handles Atari pixels)")
    if not np.all(np.isfinite(act.low) & np.isfinite(act.high)):
        print(f"note: --env-id {env_id} has unbounded action dimensions ({act}); those actions are sent to the env "
              "as sampled from the Gaussian, without clipping", file=sys.stderr)


def env_state(env: gym.Env) -> dict:
    """Everything a checkpoint needs to continue one env exactly.

    The env and its wrappers pickle as they are. MuJoCo envs pickle only their constructor arguments, so
    the simulator's full integration state and the env's random generator are saved beside them.
    """
    u, sim = env.unwrapped, None
    if hasattr(u, "model") and hasattr(u, "data"):
        sim = np.empty(mujoco.mj_stateSize(u.model, mujoco.mjtState.mjSTATE_INTEGRATION))
        mujoco.mj_getState(u.model, u.data, sim, mujoco.mjtState.mjSTATE_INTEGRATION)
    return {"env": cloudpickle.dumps(env), "sim": sim, "rng": u.np_random}


def restore_env_state(state: dict) -> gym.Env:
    env = pickle.loads(state["env"])
    if state["sim"] is not None:
        u = env.unwrapped
        mujoco.mj_setState(u.model, u.data, state["sim"], mujoco.mjtState.mjSTATE_INTEGRATION)
        u.np_random = state["rng"]
    return env


def env_stats(envs: gym.vector.VectorEnv) -> dict:
    """The observation statistics belong to the trained model: without them the policy sees other inputs."""
    return {"obs_rms": rms_to_dict(obs_normalizer(envs).obs_rms)}


def load_env_stats(envs: gym.vector.VectorEnv, stats: dict) -> None:
    """Use a saved agent's observation statistics, frozen: evaluation episodes must not shift the inputs
    the policy was trained on."""
    if "obs_rms" not in stats:
        raise UsageError("this saved agent holds no observation statistics (it was written by an older version "
                         "of ppo_continuous.py); evaluate it with that version")
    normalizer = obs_normalizer(envs)
    normalizer.obs_rms = rms_from_dict(stats["obs_rms"])
    normalizer.update_running_mean = False


def rms_to_dict(rms) -> dict:
    return {"mean": torch.as_tensor(rms.mean).clone(), "var": torch.as_tensor(rms.var).clone(),
            "count": float(rms.count)}


def rms_from_dict(d: dict):
    rms = gym.wrappers.utils.RunningMeanStd(shape=tuple(d["mean"].shape))
    rms.mean, rms.var, rms.count = d["mean"].double().numpy(), d["var"].double().numpy(), d["count"]
    return rms


def obs_normalizer(envs: gym.vector.VectorEnv) -> gym.wrappers.vector.NormalizeObservation:
    """The observation normalization wrapper in envs: its statistics belong to the trained model."""
    return find_wrapper(envs, gym.wrappers.vector.NormalizeObservation)


def reward_normalizer(envs: gym.vector.VectorEnv) -> gym.wrappers.vector.NormalizeReward:
    return find_wrapper(envs, gym.wrappers.vector.NormalizeReward)


def find_wrapper(envs: gym.vector.VectorEnv, kind: type) -> gym.vector.VectorWrapper:
    env = envs
    while not isinstance(env, kind):
        env = env.env
    return env


class SharedStatistics:
    """Under torchrun, every rank normalizes with the statistics of all ranks' data, and the saved model
    holds them: merge() after each rollout. A plain run has nothing to merge.

    Each rank's running mean/std of observations and of discounted returns is the common result of the
    last merge (`synced`) updated with its own data since. The sums n, n * mean and n * E[x^2] add up
    over ranks once that common part is counted only once.
    """

    def __init__(self, envs: gym.vector.VectorEnv, resumed: bool):
        self.stats = [obs_normalizer(envs).obs_rms, reward_normalizer(envs).return_rms]
        # What all ranks share as of the last merge: nothing yet, or the checkpoint's statistics.
        self.synced = copy.deepcopy(self.stats) if resumed else [
            gym.wrappers.utils.RunningMeanStd(shape=np.shape(rms.mean)) for rms in self.stats]

    def merge(self) -> None:
        if not distributed():
            return

        def sums(rms) -> np.ndarray:
            mean = np.ravel(rms.mean)
            return np.concatenate([[rms.count], rms.count * mean, rms.count * (np.ravel(rms.var) + mean**2)])

        for rms, old in zip(self.stats, self.synced):
            total = all_sum(torch.from_numpy(sums(rms))).numpy() - (dist.get_world_size() - 1) * sums(old)
            n, dim = total[0], np.size(rms.mean)
            mean = total[1 : 1 + dim] / n
            rms.mean = mean.reshape(np.shape(rms.mean))
            rms.var = np.maximum(total[1 + dim :] / n - mean**2, 0.0).reshape(np.shape(rms.var))
            rms.count = n
        self.synced = copy.deepcopy(self.stats)


# ====================================================================================================
# Part B: running the experiment
#
# Everything below runs the experiment around train(): option checks, torchrun, seeding, resume, the
# run folder, logs, progress, health warnings, checkpoints, signals, result files, evaluation of a
# saved agent and main(). None of it changes a number that PPO computes (under torchrun, all_sum and
# average_gradients make the ranks one agent). It is the same text in all three scripts, and a test
# keeps it so: what differs by environment family comes in through the hooks of Part A (make_envs,
# check_spaces, env_state, restore_env_state, env_stats, load_env_stats, OBS_DTYPE) and the Agent's methods.
# ====================================================================================================
class UsageError(Exception):
    """Bad input from the user: printed as one line, never as a traceback."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: training stops instead of learning from garbage."""


# ----------------------------------------------------------------------------------------------------
# Checks of the options, before anything is built
# ----------------------------------------------------------------------------------------------------
def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args: Args) -> None:
    """Refuse bad options before anything is built, in one line naming the value and what would work."""
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag(field.name)} is {value}; it must be a finite number")
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "eval_episodes"):
        if getattr(args, name) <= 0:
            raise UsageError(f"{flag(name)} is {getattr(args, name)}; it must be a positive integer")
    for name in ("learning_rate", "clip_coef", "max_grad_norm", "clip_obs", "clip_reward"):
        if hasattr(args, name) and not getattr(args, name) > 0:
            raise UsageError(f"{flag(name)} is {getattr(args, name)}; it must be positive")
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"{flag(name)} is {getattr(args, name)}; it must lie in [0, 1] (typical: 0.99, 0.95)")
    for name in ("ent_coef", "vf_coef", "checkpoint_every", "checkpoint_minutes", "torch_threads"):
        if getattr(args, name) < 0:
            raise UsageError(f"{flag(name)} is {getattr(args, name)}; it must be 0 or more")
    if getattr(args, "sticky_actions", None) is not None and not 0.0 <= args.sticky_actions < 1.0:
        raise UsageError(f"--sticky-actions is {args.sticky_actions}; it must lie in [0, 1) (0.25 is ALE v5's default)")
    if args.target_kl is not None and not args.target_kl > 0:
        raise UsageError(f"--target-kl is {args.target_kl}; it must be positive (typical: 0.01 to 0.05), or left out")
    if args.batch_size % args.num_minibatches:
        raise UsageError(
            f"the batch (num_envs * num_steps = {args.num_envs} * {args.num_steps} = {args.batch_size}) does not split "
            f"into --num-minibatches {args.num_minibatches}; choose a divisor of {args.batch_size}, e.g. "
            f"{best_divisor(args.batch_size, args.num_minibatches)}")
    if args.minibatch_size < 2:
        raise UsageError(f"minibatches of {args.minibatch_size} transition(s) are too small to normalize advantages; "
                         "use fewer --num-minibatches")
    if args.num_iterations == 0:
        ranks = " * ranks" if args.world_size > 1 else ""
        raise UsageError(f"--total-timesteps {args.total_timesteps} is less than one batch "
                         f"({args.batch_size * args.world_size} = num_envs * num_steps{ranks}); raise it or shrink the "
                         "batch")
    check_env_id(args.env_id)


def best_divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - near))


def check_env_id(env_id: str) -> None:
    """Refuse an env id this script cannot train, before any env is built.

    module:Env-v0 (gymnasium's own form) first imports the module, which registers the env: your own env
    trains from the command line. The module is looked for where Python looks, and in the current folder.
    """
    module, _, name = env_id.rpartition(":")
    if module:
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        try:
            importlib.import_module(module)
        except Exception as e:
            raise UsageError(f"--env-id {env_id}: the module {module} does not import ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); put {module}.py in the current folder "
                             "or install it") from None
        if name not in gym.registry:
            theirs = [k for k, s in gym.registry.items()
                      if getattr(s.entry_point, "__module__", str(s.entry_point)).split(":")[0] == module]
            known = f"it registers {', '.join(theirs)}" if theirs else "it registers no env (call gymnasium.register)"
            raise UsageError(f"--env-id {env_id}: importing {module} did not register {name}; {known}")
    in_registry = name in gym.registry
    atari = (in_registry and "ale_py" in str(gym.registry[name].entry_point)) or (
        not in_registry and (name.startswith("ALE/") or "NoFrameskip" in name))
    if atari and SCRIPT != "ppo_atari":
        raise UsageError(f"--env-id {env_id} is an Atari game; train it with ppo_atari.py")
    if not in_registry:
        ids = [k for k in gym.registry if ("ale_py" in str(gym.registry[k].entry_point)) == (SCRIPT == "ppo_atari")]
        close = difflib.get_close_matches(name, ids, n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else "see gymnasium.registry for the known ids"
        raise UsageError(f"--env-id {env_id} is not a registered gymnasium environment; {hint}")
    if not atari and SCRIPT == "ppo_atari":
        raise UsageError(f"--env-id {env_id} is not an Atari game; train it with ppo_discrete.py (discrete actions) "
                         "or ppo_continuous.py (continuous actions)")


def check_autoreset(envs: gym.vector.VectorEnv) -> None:
    """The loop handles gymnasium's default autoreset (NEXT_STEP) only: a vector env that resets within the
    step that ends an episode returns the next episode's first observation, and the final one would be lost."""
    mode = envs.metadata.get("autoreset_mode")
    if mode != gym.vector.AutoresetMode.NEXT_STEP:
        raise UsageError(f"the vector env resets its envs in mode {getattr(mode, 'name', mode)}; the training loop "
                         "handles only gymnasium's default, AutoresetMode.NEXT_STEP (build it without autoreset_mode)")


# Options that only change how a run is watched, or how its envs are stepped (the same episodes either way), may
# differ on resume, and so may --total-timesteps; every other change is refused.
FREE_ON_RESUME = ("progress", "track", "wandb_project_name", "wandb_entity", "checkpoint_every", "checkpoint_minutes",
                  "resume", "eval_checkpoint", "eval_episodes", "eval_seed", "eval_deterministic", "exp_name",
                  "run_name", "async_envs", "total_timesteps", "save_model")
CHECKPOINT_FORMAT = 2


def load_checkpoint(args: Args) -> dict:
    """The checkpoint to resume from, once it is known to continue this run as an uninterrupted one would."""
    ckpt = load_file(args.resume, "checkpoint")
    if "optimizer" not in ckpt:
        raise UsageError(f"--resume {args.resume} is a saved agent, not a checkpoint; resume from "
                         "runs/<run_name>/checkpoint.pt")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"--resume {args.resume} was written by an older version of {SCRIPT}.py; finish that run "
                         "with that version, or start anew")
    saved, now = ckpt["args"], asdict(args)
    for name in now:
        if name not in FREE_ON_RESUME and saved.get(name) != now[name]:
            raise UsageError(f"--resume {args.resume} was trained with {flag(name)} {saved.get(name)}, not "
                             f"{now[name]}; "
                             f"a resumed run continues as it started (only {flag('total_timesteps')} and options that "
                             "watch the run may change): drop the option")
    if len(ckpt["ranks"]) != args.world_size:
        raise UsageError(f"--resume {args.resume} was written by a run of {len(ckpt['ranks'])} process(es), not "
                         f"{args.world_size}; resume it with as many (torchrun --nproc-per-node, or python for 1)")
    if args.total_timesteps < ckpt["global_step"]:
        raise UsageError(f"--total-timesteps {args.total_timesteps} is less than the {ckpt['global_step']} steps the "
                         f"checkpoint {args.resume} has already trained")
    args.run_name = saved["run_name"]  # a resumed run goes on in its own folder
    return ckpt


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


def distributed() -> bool:
    """Whether this process is one of several ranks (torchrun)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over all ranks (x itself in a single-process run)."""
    if distributed():
        x = x.clone()
        dist.all_reduce(x)
    return x


def average_gradients(params: list[torch.Tensor]) -> None:
    """Replace every rank's gradients by their mean over the ranks, in one flat all-reduce.

    DistributedDataParallel does the same from hooks inside backward(); written out, the update stays
    readable and works with any method of the agent, not only its forward().
    """
    if not distributed():
        return
    grads = [p.grad for p in params]
    mean = all_sum(torch.cat([g.flatten() for g in grads])) / dist.get_world_size()
    for g, m in zip(grads, mean.split([g.numel() for g in grads])):
        g.copy_(m.view_as(g))


# ----------------------------------------------------------------------------------------------------
# Vector envs: stepped in this process or in processes of their own, saved and restored for checkpoints
# ----------------------------------------------------------------------------------------------------
def vector_env(recipes: list, async_envs: bool) -> gym.vector.VectorEnv:
    """The envs of the recipes stepped as one: one after another in this process (SyncVectorEnv), or each in
    a process of its own (AsyncVectorEnv), which pays for slow envs on a machine with a core per env to spare.
    An async env answers checkpoints from its own process."""
    if not async_envs:
        return gym.vector.SyncVectorEnv(recipes)
    return gym.vector.AsyncVectorEnv([functools.partial(answering_checkpoints, recipe) for recipe in recipes])


def answering_checkpoints(recipe: Callable[[], gym.Env]) -> gym.Env:
    if multiprocessing.current_process().name != "MainProcess":
        # A terminal's Ctrl-C (and a scheduler's SIGTERM to the job) reaches every process of the group: the
        # env's process leaves it to the training process, which finishes its update and checkpoints.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    env = recipe()
    env.checkpoint_state = functools.partial(env_state, env)  # called in the env's process (envs_state)
    return env


def envs_state(envs: gym.vector.VectorEnv) -> dict:
    """What a checkpoint needs to continue a vector env exactly: its wrappers (with their statistics and
    episode counters), pickled without the vector env under them, and each env's state (env_state of Part A).
    "envs" is None when an env holds what cannot be pickled (an open file, a socket): a resumed run then
    starts new episodes under the saved wrappers."""
    bottom = envs.unwrapped
    if not isinstance(bottom, (gym.vector.SyncVectorEnv, gym.vector.AsyncVectorEnv)):
        try:  # an env's own vector version (CartPole's) pickles whole
            return {"whole": cloudpickle.dumps(envs)}
        except Exception:
            return {"whole": None}
    try:
        if isinstance(bottom, gym.vector.AsyncVectorEnv):
            states = list(bottom.call("checkpoint_state"))
        else:
            states = [env_state(env) for env in bottom.envs]
    except Exception:
        states = None
    inner = innermost_wrapper(envs)
    if inner is None:
        return {"wrappers": None, "envs": states}
    inner.env = None
    try:
        return {"wrappers": cloudpickle.dumps(envs), "envs": states}
    finally:
        inner.env = bottom


def restore_envs(envs: gym.vector.VectorEnv, state: dict, pending: np.ndarray,
                 async_envs: bool) -> tuple[gym.vector.VectorEnv, bool]:
    """The envs to continue with, and whether they are the saved ones (else new ones, to be reset).

    envs: new, unused envs (closed here if the saved ones replace them); pending: the envs whose episode ended
    on the last step, which the next step only resets (gymnasium's autoreset on the next step; a vector env
    rebuilt from its envs does not know it, so ResetOnNextStep does it once).
    """
    if "whole" in state:
        if state["whole"] is None:
            return envs, False
        envs.close()
        return pickle.loads(state["whole"]), True
    bottom = envs.unwrapped
    if state["envs"] is not None:
        envs.close()
        bottom = vector_env([functools.partial(restored_env, s, p) for s, p in zip(state["envs"], pending)],
                            async_envs)
    if state["wrappers"] is None:
        return bottom, state["envs"] is not None
    wrappers = pickle.loads(state["wrappers"])
    innermost_wrapper(wrappers).env = bottom
    return wrappers, state["envs"] is not None


def restored_env(state: dict, pending: bool) -> gym.Env:
    env = restore_env_state(state)
    return ResetOnNextStep(env) if pending else env


class ResetOnNextStep(gym.Wrapper):
    """Resets the env on its next step, as gymnasium's vector envs do after an episode ends: that step returns
    the next episode's first observation with reward 0, and ignores the action. Then it steps as usual."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.pending = True

    def step(self, action):
        if not self.pending:
            return self.env.step(action)
        self.pending = False
        obs, info = self.env.reset()
        return obs, 0.0, False, False, info


def innermost_wrapper(envs: gym.vector.VectorEnv) -> Optional[gym.vector.VectorWrapper]:
    if not isinstance(envs, gym.vector.VectorWrapper):
        return None
    while isinstance(envs.env, gym.vector.VectorWrapper):
        envs = envs.env
    return envs


# ----------------------------------------------------------------------------------------------------
# Files: saving, loading, results
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
        raise UsageError(f"{what} {path} cannot be read ({type(e).__name__}); it is corrupt or not a file written by "
                         "this script") from None
    if not isinstance(data, dict) or "script" not in data or "model" not in data:
        raise UsageError(f"{what} {path} is not a file written by {SCRIPT}.py")
    if data["script"] != SCRIPT:
        raise UsageError(f"{what} {path} was written by {data['script']}.py; load it with that script")
    return data


def saved_args(data: dict) -> Args:
    """The options a saved agent or checkpoint was trained with (options it does not know keep their defaults)."""
    return Args(**{k: v for k, v in data["args"].items() if k in Args.__dataclass_fields__})


def write_results(run_dir: str, args: Args, episodes: dict, global_step: int, elapsed: float, ended: bool) -> dict:
    """Every finished episode to episodes.csv and the run's totals to summary.json, in the run folder; ended:
    whether the run came to its end (no error, no signal).

    Plain files that the benchmark suite (or a spreadsheet) reads without TensorBoard.
    """
    with open(os.path.join(run_dir, "episodes.csv"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["global_step", "time_s", "return", "length"])
        out.writerows(zip(episodes["steps"], (round(t, 3) for t in episodes["times"]), episodes["returns"],
                          episodes["lengths"]))
    summary = {"script": SCRIPT, "env_id": args.env_id, "seed": args.seed, "global_step": global_step,
               "total_timesteps": args.total_timesteps,
               # Every update done, and none stopped by an error (a NaN loss in the last update) or a signal.
               "finished": ended and global_step >= args.num_iterations * args.batch_size * args.world_size,
               "time_s": round(elapsed, 3), "sps": round(global_step / max(elapsed, 1e-9), 1),
               "episodes": len(episodes["returns"]),
               "final_return": float(np.mean(episodes["returns"][-100:])) if episodes["returns"] else None}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


# ----------------------------------------------------------------------------------------------------
# Logs, progress, health warnings
# ----------------------------------------------------------------------------------------------------
def explained_variance(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    """[1 - Var(returns - values) / Var(returns), whether the returns vary] over all ranks' batches, as a
    tensor on the device (read with the update's other diagnostics, in one copy).

    Explained variance says little when returns barely vary (e.g. every episode hits the time limit):
    the second value is 0 then.
    """
    y, e = y_true.double(), (y_true - y_pred).double()
    s = all_sum(torch.stack([y.new_tensor(y.numel()), y.sum(), (y**2).sum(), e.sum(), (e**2).sum(), y.abs().sum()]))
    n = s[0]
    var_y, var_e = (s[2] - s[1] ** 2 / n) / (n - 1).clamp_min(1), (s[4] - s[3] ** 2 / n) / (n - 1).clamp_min(1)
    ev = torch.where(var_y > 0, 1 - var_e / var_y, torch.nan)
    return torch.stack([ev, ((var_y > 0) & (var_y.sqrt() > 0.05 * s[5] / n)).double()]).float()


class Logger:
    """TensorBoard (and optionally wandb) scalars, buffered.

    TensorBoard's writer thread competes with training for the interpreter lock; handing it scalars in
    bursts every few dozen updates instead of one at a time makes a fast run about 30% faster.
    A resumed run writes on in the same folder and the same wandb run: what the first attempt logged
    after its last checkpoint is hidden (purge_step), so no step shows twice.
    """

    def __init__(self, run_dir: str, args: Args, resumed: Optional[dict] = None, every: int = 50):
        self.buffer: list[tuple[str, float, int]] = []
        self.every = every
        self.wandb = None
        if args.track:
            import wandb

            # Patching TensorBoard to this run's own folder keeps metric names unprefixed and avoids the
            # 10-second wait at exit that sync_tensorboard alone causes.
            wandb.tensorboard.patch(root_logdir=run_dir)
            wandb_id = resumed.get("wandb_id") if resumed else None
            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                                    config=asdict(args), name=os.path.basename(run_dir), save_code=True,
                                    id=wandb_id, resume="allow" if wandb_id else None)
        self.writer = SummaryWriter(run_dir, purge_step=resumed["global_step"] + 1 if resumed else None)
        if not resumed:
            table = "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")

    @property
    def wandb_id(self) -> Optional[str]:
        return self.wandb.id if self.wandb is not None else None

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
            import wandb

            self.wandb.finish()
            wandb.tensorboard.unpatch()  # the next run in this process patches its own folder


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

    def say(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class Health:
    """Watches the instability signals of PPO and prints one warning line per kind of trouble."""

    def __init__(self, progress: Progress, target_kl: Optional[float]):
        self.progress, self.seen, self.recent_ev = progress, set(), []
        # "Far above target": twice the target, or 0.05 when no target is set (typical values are ~0.01).
        self.kl_limit = 2 * target_kl if target_kl is not None else 0.05

    def check(self, metrics: dict[str, float], step: int, late: bool, returns_vary: bool = True) -> None:
        kl = metrics["losses/approx_kl"]
        if kl > self.kl_limit:
            self.warn("kl", f"approx KL {kl:.3f} > {self.kl_limit:.3f} at step {step}: the policy moves far per "
                      "update; lower --learning-rate or --update-epochs, or set --target-kl")
        # Explained variance is noisy from one batch to the next: judge its mean over the last 20 updates.
        ev = metrics["losses/explained_variance"] if returns_vary else float("nan")
        self.recent_ev = (self.recent_ev + [ev])[-20:]
        ev = float(np.nanmean(self.recent_ev)) if np.isfinite(self.recent_ev).sum() >= 10 else 0.0
        if late and ev < 0:
            self.warn("ev", f"explained variance averaged {ev:.2f} < 0 over the last 20 updates at step {step}: the "
                      "critic predicts returns worse than their mean, so advantages are mostly noise")
        if metrics["losses/ess"] < 0.5:
            self.warn("ess", f"effective sample size fell to {metrics['losses/ess']:.2f} of the minibatch at step "
                      f"{step}: a few samples dominate the gradient; lower --learning-rate or --clip-coef")

    def warn(self, kind: str, message: str) -> None:
        if kind not in self.seen:
            self.seen.add(kind)
            self.progress.warn(message + " (shown once)")


# ----------------------------------------------------------------------------------------------------
# The run: everything around train()'s loop
# ----------------------------------------------------------------------------------------------------
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class Run:
    """One training run's machinery, reached from train() by one-line calls.

    Run(args) checks the options, loads the checkpoint to resume from, joins the other ranks under torchrun,
    seeds every random stream and names the run. start() resumes (parameters, Adam, envs, random streams)
    or resets the envs, then opens the logs and catches Ctrl-C and SIGTERM. iterations() gives the update
    numbers and, between updates, writes checkpoints and stops after a signal. record() counts the steps
    and keeps the finished episodes; log_update() logs the diagnostics, checks PPO's health and moves the
    progress bar. Leaving the `with` block closes everything and writes episodes.csv and summary.json,
    however the run ended.
    """

    def __init__(self, args: Args, stop_at_step: Optional[int] = None):
        check_args(args)
        self.args, self.stop_at_step = args, stop_at_step
        self.resumed = load_checkpoint(args) if args.resume else None
        run_name = args.run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        args.run_name = run_name.replace("/", "-").replace(":", "-")
        self.rank, self.world_size, self.device = init_distributed(args.cuda)
        self.main = self.rank == 0  # the rank that logs, shows progress and writes files
        if args.cuda and self.device.type != "cuda" and self.main:
            print("note: no CUDA GPU is available; running on the CPU (--no-cuda silences this)", file=sys.stderr)
        if self.world_size > 1:
            names = [args.run_name]
            dist.broadcast_object_list(names, src=0)  # rank 0's clock names the run
            args.run_name = names[0]
        self.run_dir = os.path.join("runs", args.run_name)
        self.video_dir = os.path.join("videos", args.run_name) if args.capture_video and self.main else None

        # Each rank its own random streams; rank 0 (and a single-process run) uses --seed itself.
        random.seed(args.seed + self.rank)
        np.random.seed(args.seed + self.rank)
        torch.manual_seed(args.seed + self.rank)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)

        self.episodes = {"returns": [], "lengths": [], "steps": [], "times": []}
        self.global_step, self.first_iteration, self.elapsed_before = 0, 1, 0.0
        self.envs = self.logger = self.progress = None
        self.signal, self.handlers, self.interrupted, self.checkpoint_path = None, {}, False, None
        # On a GPU, the host waits for the device only at the copy of the actions to the envs at every step
        # (and, with --target-kl, for the KL that decides each further epoch; under torchrun, where the
        # ranks agree after each update).
        self.deferred, self.unread, self.update_times = self.device.type == "cuda", None, []

    def __enter__(self) -> "Run":
        return self

    # --- before the first update ------------------------------------------------------------------------
    def start(self, agent: nn.Module, optimizer: torch.optim.Optimizer, envs: gym.vector.VectorEnv,
              obs: torch.Tensor, valid: np.ndarray) -> gym.vector.VectorEnv:
        """Resume from the checkpoint, or reset the envs; fills the last row of obs and valid, where the first
        rollout starts. Returns the envs to train on."""
        args, N = self.args, self.args.num_envs
        check_autoreset(envs)
        if self.world_size > 1:
            for p in agent.parameters():
                dist.broadcast(p.data, src=0)  # every rank starts from rank 0's initialization
        ckpt = self.resumed
        if ckpt is None:
            # No two envs of the job share a seed: rank r's env i is seeded like env r * num_envs + i of one big run.
            next_obs, _ = envs.reset(seed=args.seed + self.rank * N)
            next_valid = np.ones(N, dtype=bool)
        else:
            try:
                agent.load_state_dict(ckpt["model"])
                optimizer.load_state_dict(ckpt["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise UsageError(f"--resume {args.resume} does not fit this network "
                                 f"({str(e).splitlines()[0]})") from None
            rank_state = ckpt["ranks"][self.rank]
            envs, restored = restore_envs(envs, rank_state["envs"], ~rank_state["next_valid"], args.async_envs)
            if not restored:  # the envs could not be saved: new episodes, seeded apart from the first start's
                next_obs, _ = envs.reset(seed=args.seed + self.rank * N + ckpt["global_step"])
                next_valid = np.ones(N, dtype=bool)
            else:
                next_obs, next_valid = rank_state["next_obs"], rank_state["next_valid"]
            rng = rank_state["rng"]
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
            if self.device.type == "cuda" and rng["cuda"] is not None:  # the sampling noise and shuffles on the GPU
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            self.global_step, self.first_iteration = ckpt["global_step"], ckpt["iteration"] + 1
            self.episodes, self.elapsed_before = ckpt["episodes"], ckpt["elapsed"]
        obs[-1] = torch.as_tensor(next_obs, device=self.device)
        valid[-1] = next_valid
        self.agent, self.optimizer, self.envs, self.obs, self.valid = agent, optimizer, envs, obs, valid
        if self.deferred:
            optimizer.found_inf = torch.zeros((), device=self.device)

        if self.main:
            os.makedirs(self.run_dir, exist_ok=True)
            self.logger = Logger(self.run_dir, args, ckpt)
        self.progress = Progress(args.progress and self.main, args.total_timesteps, self.global_step)
        self.health = Health(self.progress, args.target_kl)
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_NAMES:
                self.handlers[signum] = signal.signal(signum, self.on_signal)
        self.start_time = self.last_checkpoint = time.time()
        self.start_step, self.episodes_sent = self.global_step, len(self.episodes["returns"])
        return envs

    def on_signal(self, signum, frame) -> None:
        # The first Ctrl-C or SIGTERM lets the update finish, then a checkpoint is written; a second one quits at once.
        if self.signal is not None:
            raise KeyboardInterrupt(signum)  # main() exits with 128 + signum, as the signal itself would
        self.signal = signum
        if self.main:
            self.progress.warn(f"{SIGNAL_NAMES[signum]}: finishing this update, then writing a checkpoint "
                               f"({SIGNAL_NAMES[signum]} again quits at once)")

    # --- during training ----------------------------------------------------------------------------------
    def iterations(self):
        """The numbers of the updates still to run. After each: a checkpoint when one is due (every
        --checkpoint-every updates, every --checkpoint-minutes), and the end of the run after Ctrl-C or SIGTERM
        (with a checkpoint) or at stop_at_step."""
        for iteration in range(self.first_iteration, self.args.num_iterations + 1):
            self.iteration = iteration
            started = time.time()
            yield iteration
            self.report_compile_time(time.time() - started)
            every = self.args.checkpoint_every and iteration % self.args.checkpoint_every == 0
            minutes = self.args.checkpoint_minutes and \
                time.time() - self.last_checkpoint >= 60 * self.args.checkpoint_minutes
            # A signal during the last update changes nothing: the run is complete.
            stop, due = self.agree(self.signal is not None and iteration < self.args.num_iterations, every or minutes)
            if stop or due:
                self.checkpoint()
            if stop:
                self.interrupted = True
                return
            if self.stop_at_step is not None and self.global_step >= self.stop_at_step:
                return

    def report_compile_time(self, seconds: float) -> None:
        """With --compile, say what compiling cost: the first updates' times (compiling, and recompiling once
        the minibatch sizes vary) against the third's."""
        self.update_times.append(seconds)
        if self.args.compile and len(self.update_times) == 3 and self.main:
            first, second, third = self.update_times
            self.progress.say(f"torch.compile: the first two updates took {first:.1f} s and {second:.1f} s "
                              f"(compiling), the third {third:.2f} s")

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag raised on any rank, so that all ranks stop and checkpoint after the same update
        (a signal reaches them at slightly different moments)."""
        if self.world_size == 1:
            return list(flags)
        return [x > 0 for x in all_sum(torch.tensor([float(f) for f in flags], device=self.device)).tolist()]

    def record(self, info: dict) -> None:
        """Count one step of the vector env, and keep the episodes that ended in it."""
        self.global_step += self.args.num_envs * self.world_size
        if "_episode" in info:
            ended = info["_episode"]
            n_ended = int(ended.sum())
            self.episodes["returns"].extend(info["episode"]["r"][ended].tolist())
            self.episodes["lengths"].extend(info["episode"]["l"][ended].tolist())
            self.episodes["steps"].extend([self.global_step] * n_ended)
            self.episodes["times"].extend([self.elapsed()] * n_ended)

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start_time

    def check_batch(self, n_transitions: int) -> None:
        # A minibatch of one has no advantage std to normalize by. Every rank stops, not only the short one.
        if self.agree(n_transitions < 2 * self.args.num_minibatches)[0]:
            held = f"only {n_transitions}" if self.world_size == 1 else f"too few (this rank's: {n_transitions})"
            raise UsageError(f"this rollout holds {held} transitions to learn from (the other steps only "
                             f"reset an env after its episode ended), too few for --num-minibatches "
                             f"{self.args.num_minibatches}; use fewer minibatches or a larger --num-steps")

    def check_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Stop the run on a NaN or infinite loss before its optimizer step is applied.

        On a GPU, looking at the loss would make the host wait for the device: there fused Adam skips the step
        itself (its found_inf, as GradScaler uses it), and every later one of the update, and the update's
        logs stop the run. The gradients are averaged over the ranks first, so all ranks skip alike.
        """
        if self.deferred:
            torch.maximum(self.optimizer.found_inf, (~torch.isfinite(grad_norm)).float(), out=self.optimizer.found_inf)
        elif not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            raise TrainingDiverged(
                f"the loss became {loss.item()} (gradient norm {grad_norm.item()}) at step {self.global_step} (update "
                f"{self.iteration}); training stopped before applying it. Lower --learning-rate or --max-grad-norm; "
                f"the last checkpoint (if any) is kept in {self.run_dir}")

    def log_update(self, diagnostics: dict[str, torch.Tensor], explained_var: torch.Tensor, epochs: int) -> None:
        """Log one update's diagnostics, averaged over the ranks, check PPO's health, move the progress bar.

        The diagnostics reach the host in one copy. On a GPU that copy does not wait: it is read at the next
        update (and at the end), so the device never idles for the logs.
        """
        if self.world_size > 1:  # rank 0 logs the episodes of every rank
            everyone = [None] * self.world_size if self.main else None
            dist.gather_object({k: v[self.episodes_sent:] for k, v in self.episodes.items()}, everyone, dst=0)
            for other in everyone[1:] if self.main else []:
                for k, v in other.items():
                    self.episodes[k].extend(v)
            self.episodes_sent = len(self.episodes["returns"])
        values = torch.cat([all_sum(torch.stack(list(diagnostics.values()))) / self.world_size, explained_var,
                            self.optimizer.found_inf.view(1) if self.deferred else explained_var[:0]])
        metrics = {"losses/epochs": epochs, "charts/learning_rate": self.optimizer.param_groups[0]["lr"],
                   "charts/SPS": (self.global_step - self.start_step) / (time.time() - self.start_time)}
        if self.episodes["returns"]:
            metrics["charts/episodic_return"] = float(np.mean(self.episodes["returns"][-20:]))
            metrics["charts/episodic_length"] = float(np.mean(self.episodes["lengths"][-20:]))
        update = (list(diagnostics), metrics, self.global_step, self.iteration)
        if not self.deferred:
            return self.write_update(*update, values.tolist())
        copy, done = values.to("cpu", non_blocking=True), torch.cuda.Event()
        done.record()
        previous, self.unread = self.unread, (update, copy, done)
        if previous is not None:
            self.read(previous)

    def read(self, unread) -> None:
        update, copy, done = unread
        done.synchronize()  # waits for that copy alone, queued long ago
        self.write_update(*update, copy.tolist())

    def write_update(self, names: list[str], metrics: dict, step: int, iteration: int, values: list[float]) -> None:
        if self.deferred and values[-1]:
            raise TrainingDiverged(
                f"a loss became nan or infinite in update {iteration} (by step {step}); its optimizer step and the "
                f"later ones were skipped and training stopped. Lower --learning-rate or --max-grad-norm; the last "
                f"checkpoint (if any) is kept in {self.run_dir}")
        metrics = {**{f"losses/{k}": v for k, v in zip(names, values)}, "losses/explained_variance": values[len(names)],
                   **metrics}
        if self.main:
            self.logger.log(metrics, step)
            self.health.check(metrics, step, late=iteration > self.args.num_iterations // 2,
                              returns_vary=bool(values[len(names) + 1]))
            self.progress.update(step, metrics["charts/SPS"], metrics.get("charts/episodic_return", float("nan")))

    def checkpoint(self) -> Optional[str]:
        """Write runs/<run>/checkpoint.pt: all a resumed run needs to go on as an uninterrupted one would."""
        if self.unread is not None:  # on a GPU: this update's logs first (and its loss checked), then the file
            unread, self.unread = self.unread, None
            self.read(unread)
        # Parameters and optimizer are the same on every rank; envs and random streams are each rank's own.
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        rank_state = {"envs": envs_state(self.envs), "next_obs": self.obs[-1].cpu().numpy(),
                      "next_valid": self.valid[-1].copy(),
                      "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                              "python": random.getstate(), "cuda": cuda}}
        ranks = [rank_state]
        if self.world_size > 1:
            ranks = [None] * self.world_size if self.main else None
            dist.gather_object(rank_state, ranks, dst=0)
        self.last_checkpoint = time.time()
        if not self.main:
            return None
        self.logger.flush()  # every scalar up to this update is on disk, so a crash now loses none of them
        self.checkpoint_path = os.path.join(self.run_dir, "checkpoint.pt")
        save_atomic({"script": SCRIPT, "format": CHECKPOINT_FORMAT, "args": asdict(self.args),
                     "iteration": self.iteration,
                     "global_step": self.global_step, "model": self.agent.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "env_stats": env_stats(self.envs), "ranks": ranks,
                     "episodes": self.episodes, "elapsed": self.elapsed(), "wandb_id": self.logger.wandb_id},
                    self.checkpoint_path)
        return self.checkpoint_path

    # --- after the last update --------------------------------------------------------------------------
    def result(self, agent: nn.Module) -> dict:
        """Save the trained agent (with --save-model), and what train() returns."""
        if self.unread is not None:  # the last update's logs, on a GPU
            self.read(self.unread)
        path = os.path.join(self.run_dir, "agent.pt")
        if self.args.save_model and not self.interrupted and self.main:
            # The env statistics belong to the model: without them the policy would see other inputs.
            save_atomic({"script": SCRIPT, "args": asdict(self.args), "model": agent.state_dict(),
                         "env_stats": env_stats(self.envs)}, path)
        return {"agent": agent, "run_dir": self.run_dir, "episodes": self.episodes, "global_step": self.global_step,
                "interrupted": self.interrupted, "signal": self.signal, "env_stats": env_stats(self.envs)}

    def __exit__(self, kind, error, traceback) -> None:
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)
        try:
            if self.progress is not None:
                self.progress.close()
            if self.main and self.logger is not None:  # the logs and result files first: nothing below may lose them
                self.logger.close()
                finished = error is None and not self.interrupted
                summary = write_results(self.run_dir, self.args, self.episodes, self.global_step, self.elapsed(),
                                        finished)
                if error is None or isinstance(error, KeyboardInterrupt):
                    self.progress.say(self.closing_line(summary))
        finally:
            try:
                if self.envs is not None:
                    self.envs.close()
            finally:
                if self.world_size > 1:
                    if error is None:
                        dist.barrier()  # no rank tears down the process group while another still uses it
                    dist.destroy_process_group()

    def closing_line(self, summary: dict) -> str:
        final = "no episode finished" if summary["final_return"] is None else \
            f"final return {summary['final_return']:.2f} (mean of the last {min(100, summary['episodes'])} episodes)"
        head = "finished" if summary["finished"] else (
            f"stopped by {SIGNAL_NAMES.get(self.signal, 'request')}" if self.signal else "stopped")
        line = (f"{head}: {self.global_step:,} of {self.args.total_timesteps:,} steps in {summary['time_s']:.0f} s "
                f"({summary['sps']:,.0f} steps/s), {final}; files in {self.run_dir} (tensorboard --logdir runs)")
        if self.interrupted and self.checkpoint_path:
            command = f"python {SCRIPT}.py" if self.world_size == 1 else "the same torchrun command with"
            line += f"\ncheckpoint written; continue with: {command} --resume {self.checkpoint_path}"
        return line


# ----------------------------------------------------------------------------------------------------
# Evaluation of a saved agent, and the command line
# ----------------------------------------------------------------------------------------------------
EVAL_SEED_OFFSET = 1_000_000_000  # evaluation episodes are seeded apart from every training env


def evaluate(path: str, episodes: int, seed: Optional[int] = None, deterministic: bool = False,
             video_dir: Optional[str] = None) -> np.ndarray:
    """Play `episodes` episodes with a saved agent (or a checkpoint); returns their undiscounted returns.

    seed: the env seed (default: EVAL_SEED_OFFSET + the training seed, so no training episode is replayed).
    deterministic: the most likely action instead of a sample of the policy.
    """
    data = load_file(path, "--eval-checkpoint")
    args = dataclasses.replace(saved_args(data), async_envs=False)  # one env: no process of its own
    envs = make_envs(args, 1, video_dir)
    check_spaces(args.env_id, envs)
    load_env_stats(envs, data.get("env_stats", {}))
    agent = Agent(envs)
    try:
        agent.load_state_dict(data["model"])
    except RuntimeError as e:
        raise UsageError(f"--eval-checkpoint {path} does not fit this network ({str(e).splitlines()[0]})") from None
    seed = EVAL_SEED_OFFSET + args.seed if seed is None else seed
    torch.manual_seed(seed)
    returns = []
    next_obs, _ = envs.reset(seed=seed)
    with torch.inference_mode():
        while len(returns) < episodes:
            action = agent.act(torch.as_tensor(next_obs, dtype=OBS_DTYPE), deterministic=deterministic)
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
            default = saved_args(load_file(resume, "checkpoint"))
        args = tyro.cli(Args, args=argv, default=default, description=__doc__.split("\n")[0])
        if args.eval_checkpoint:
            if args.world_size > 1:
                raise UsageError("--eval-checkpoint plays in one process; run it with python, not torchrun")
            if args.eval_episodes <= 0:
                raise UsageError(f"--eval-episodes is {args.eval_episodes}; it must be a positive integer")
            folder = os.path.basename(os.path.dirname(os.path.abspath(args.eval_checkpoint)))
            video_dir = os.path.join("videos", "eval-" + folder) if args.capture_video else None
            seed = args.eval_seed if args.eval_seed is not None else EVAL_SEED_OFFSET + saved_args(
                load_file(args.eval_checkpoint, "--eval-checkpoint")).seed
            returns = evaluate(args.eval_checkpoint, args.eval_episodes, seed, args.eval_deterministic, video_dir)
            mode = "deterministic actions" if args.eval_deterministic else "actions sampled from the policy"
            print(f"{len(returns)} episodes ({mode}, env seed {seed}): return {returns.mean():.2f} +- "
                  f"{returns.std():.2f} (min {returns.min():.1f}, max {returns.max():.1f})")
            return 0
        result = train(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except gym.error.DependencyNotInstalled as e:
        print(f"error: the env needs a package that is not installed: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        return 128 + (e.args[0] if e.args else signal.SIGINT)
    return 128 + result["signal"] if result["interrupted"] else 0


def exit_with(code: int) -> None:
    """End the process with this exit status. A torchrun rank skips the interpreter's teardown: there,
    after every file is written, Gloo's threads sometimes abort a rank ("terminate called without an
    active exception"; one two-rank CPU run in sixty on a 2-core machine), and torchrun would report the
    whole job as failed. By then main() has closed the logs, the envs and the process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_with(main())
