"""The break of every row of DETAILS.md: the smallest careless edit of that detail, each `old` text replaced by `new`,
made in each script the row names (or only in the script given as "only"). tests/mutations.py makes each break in a
copy of the project and runs the row's tests there: at least one of them must fail. Keyed by the row's detail, without
its number, up to its first colon."""

BREAKS = {
    # --- the 13 core details ---
    "vectorized architecture": {
        "edits": [("self.global_step += self.args.num_envs * self.world_size", "self.global_step += self.world_size")]
    },
    "orthogonal initialization of weights and constant initialization of biases": {
        "edits": [("nn.init.orthogonal_(layer.weight, std)", "nn.init.orthogonal_(layer.weight)")]
    },
    "the Adam optimizer's epsilon parameter": {"edits": [("eps=1e-5, fused=True", "eps=1e-8, fused=True")]},
    "Adam learning rate annealing": {
        "edits": [("(1.0 - (iteration - 1.0) / args.num_iterations)", "(1.0 - iteration / args.num_iterations)")]
    },
    "generalized advantage estimation": {
        "edits": [
            ("discounts = gamma * gae_lambda * (1.0 - dones)", "discounts = gamma * gae_lambda * (1.0 - terminations)")
        ]
    },
    "mini-batch updates": {"edits": [("b_inds[torch.randperm(len(b_inds), device=device)], args", "b_inds, args")]},
    "normalization of advantages": {
        "edits": [("return ((x - mean) / (std + 1e-8)).to(x.dtype)", "return (x / (std + 1e-8)).to(x.dtype)")]
    },
    "clipped surrogate objective": {
        "edits": [("-advantages * clipped_ratio).mean()", "-advantages * clipped_ratio).sum()")]
    },
    "value function loss clipping": {
        "edits": [
            (
                "v_clipped = oldvalue + torch.clamp(newvalue - oldvalue, -clip_coef, clip_coef)",
                "v_clipped = torch.clamp(newvalue, -clip_coef, clip_coef)",
            )
        ]
    },
    "overall loss and entropy bonus": {
        "edits": [
            (
                "loss = pg_loss - ent_coef * entropy_loss + vf_coef * v_loss",
                "loss = pg_loss + ent_coef * entropy_loss + vf_coef * v_loss",
            )
        ]
    },
    "global gradient clipping": {
        "edits": [
            (
                "nn.utils.clip_grad_norm_(params, args.max_grad_norm)",
                "nn.utils.clip_grad_norm_(params[:1], args.max_grad_norm)",
            )
        ]
    },
    "debug variables": {"edits": [('"approx_kl": kl / n', '"approx_kl": naive_kl / n')]},
    "shared and separate MLP networks for policy and value functions": {
        "edits": [
            (
                "return action, logp, entropy, self.critic(critic_x).squeeze(-1), state",
                "return action, logp, entropy, self.critic[-1](self.actor[:-1](x)).squeeze(-1), state",
            )
        ]
    },
    # --- the 9 Atari details ---
    "NoopResetEnv": {"edits": [("env, noop_max=30, frame_skip=4", "env, noop_max=0, frame_skip=4")]},
    "MaxAndSkipEnv": {"edits": [("frame_skip=4", "frame_skip=3")]},
    "EpisodicLifeEnv": {"edits": [("dones[step] = done | life_lost", "dones[step] = done")]},
    "FireResetEnv": {"edits": [('get_action_meanings()[1:2] == ["FIRE"]', 'get_action_meanings()[0:1] == ["FIRE"]')]},
    "WarpFrame": {"edits": [("screen_size=84", "screen_size=80")]},
    "ClipRewardEnv": {
        "edits": [("TransformReward(envs, np.sign)", "TransformReward(envs, lambda reward: reward / 10)")]
    },
    "FrameStack": {
        "edits": [
            ("FrameStackObservation(env, frame_stack)", 'FrameStackObservation(env, frame_stack, padding_type="zero")')
        ]
    },
    "shared Nature-CNN network": {"edits": [("shape[0], 32, 8, stride=4)", "shape[0], 32, 8, stride=2)")]},
    "scaling the images to [0, 1]": {"edits": [("/ 255.0)", "/ 256.0)")]},
    # --- the 9 continuous-control details ---
    "continuous actions via normal distributions": {
        "edits": [("- logstd - 0.5 * math.log(2 * math.pi)).sum(-1)", "- 0.5 * math.log(2 * math.pi)).sum(-1)")]
    },
    "state-independent log standard deviation": {
        "edits": [("nn.Parameter(torch.zeros(1, act_dim))", "nn.Parameter(torch.ones(1, act_dim))")]
    },
    "independent action components": {
        "edits": [
            ("- logstd - 0.5 * math.log(2 * math.pi)).sum(-1)", "- logstd - 0.5 * math.log(2 * math.pi)).mean(-1)")
        ]
    },
    "separate MLP networks for policy and value functions": {
        "edits": [
            (
                "return action, logp, entropy, self.critic(critic_x).squeeze(-1), state",
                "return action, logp, entropy, self.critic[-1](self.actor_mean[:-1](x)).squeeze(-1), state",
            )
        ]
    },
    "handling of action clipping to valid range and storage": {"edits": [("np.clip(action, low, high)", "action")]},
    "normalization of observation": {
        "edits": [("NormalizeObservation(envs)", "NormalizeObservation(envs, epsilon=1.0)")]
    },
    "observation clipping": {
        "edits": [("np.clip(obs, -args.clip_obs, args.clip_obs)", "np.clip(obs, -args.clip_obs, args.clip_reward)")]
    },
    "reward scaling": {"edits": [("ScaleReward(envs, gamma=args.gamma)", "ScaleReward(envs)")]},
    "reward clipping": {"edits": [("np.clip(reward, -args.clip_reward,", "np.clip(reward, -args.clip_obs,")]},
    # --- the 5 LSTM details ---
    "layer initialization for LSTM layers": {"edits": [("nn.init.zeros_(param)", "pass")]},
    "initialize the LSTM states to be zeros": {
        "edits": [("                buffer[-1] = 0\n", "                pass\n")]
    },
    "reset LSTM states at the end of the episode": {"edits": [("ended = keep[end - 1]", "ended = 1")]},
    "prepare sequential rollouts in mini-batches": {
        "edits": [
            (
                "steps = torch.arange(L, device=device)[:, None] * N",
                "steps = torch.randperm(L, device=device)[:, None] * N",
            )
        ]
    },
    "reconstruct LSTM states during training": {
        "edits": [("b_actions[mb], b_states[mb[0]],", "b_actions[mb], 0 * b_states[mb[0]],")]
    },
    # --- the MultiDiscrete detail ---
    "MultiDiscrete action spaces": {
        "edits": [("logp, entropy = logp.sum(-1), entropy.sum(-1)", "logp, entropy = logp.mean(-1), entropy.mean(-1)")]
    },
    # --- part two, every other computation: discrete envs of your own ---
    "invalid action masking": {
        "edits": [("self.mask_size :] > 0.5, self.actor(x), -1e8)", "self.mask_size :] > 0.5, self.actor(x), -1e-8)")]
    },
    "observations gymnasium can flatten": {"edits": [("    return space.is_np_flattenable", "    return False")]},
    "an episode's final observation may allow no action": {"edits": [(" | np.reshape(ended, (-1, 1))", "")]},
    "action spaces that start elsewhere than 0": {"edits": [("lambda a: a + space.start", "lambda a: a")]},
    "masks that appear only after a step": {
        "edits": [('if "action_mask" in env.step(env.action_space.sample())[-1]:', "if False:")]
    },
    "one place for an env wrapper": {
        "edits": [("return kinds[0] == kinds[1] and env.spec == other.spec", "return kinds[0] == kinds[1]")]
    },
    # --- part two: the update, the policies, the envs, the LSTM, running the experiment ---
    "early stopping on target KL": {
        "edits": [("break  # early stop on target KL", "continue  # early stop on target KL")]
    },
    "truncation is not termination": {
        "edits": [("gamma * values[1:] * (1.0 - terminations)", "gamma * values[1:] * (1.0 - dones)")]
    },
    "the autoreset step is not a transition": {"edits": [("valid[step + 1] = ~done", "valid[step + 1] = True")]},
    "the last step's bootstrap": {
        "edits": [("agent.get_value(obs[T], states[T])", "agent.get_value(obs[T - 1], states[T])")]
    },
    "the value target": {"edits": [("b_returns = b_advantages + b_values", "b_returns = b_advantages")]},
    "every epoch": {
        "edits": [("for epoch in range(args.update_epochs):", "for epoch in range(args.update_epochs - 1):")]
    },
    "every minibatch": {
        "edits": [("for mb in minibatches(b_inds, args, device):", "for mb in minibatches(b_inds, args, device)[1:]:")]
    },
    "the seed of each env": {
        "edits": [("seed=args.seed + self.rank * args.num_envs", "seed=self.rank * args.num_envs")]
    },
    "same seed, same numbers": {"edits": [("torch.manual_seed(args.seed + self.rank)", "torch.seed()")]},
    "sampling a categorical": {
        "edits": [
            (
                "(logits - torch.empty_like(logits).exponential_().log())",
                "(logits + torch.empty_like(logits).exponential_().log())",
            )
        ]
    },
    "the most likely action": {"edits": [("if deterministic else", "if False else")]},
    "the categorical log-probability": {
        "edits": [("logp_all.gather(-1, action.unsqueeze(-1))", "logp_all.gather(-1, action.unsqueeze(-1) * 0)")]
    },
    "the categorical entropy": {
        "edits": [("entropy = -(logp_all.exp() * logp_all).sum(-1)", "entropy = -(logp_all.exp() * logp_all).mean(-1)")]
    },
    "the Gaussian entropy": {
        "edits": [
            (
                "entropy = (0.5 + 0.5 * math.log(2 * math.pi) + logstd)",
                "entropy = (0.5 * math.log(2 * math.pi) + logstd)",
            )
        ]
    },
    "reward scaling in the reference order": {
        "edits": [("self.accumulated_reward[terminated | truncated] = 0.0", "pass")]
    },
    "reward statistics of real transitions only": {
        "edits": [
            (
                "self.return_rms.update(self.accumulated_reward[active])",
                "self.return_rms.update(self.accumulated_reward)",
            )
        ]
    },
    "normalization statistics with the model": {
        "edits": [('    load_env_stats(envs, data.get("env_stats", {}))', "    pass")]
    },
    "the critic's own LSTM": {
        "edits": [("self.critic(critic_x).squeeze(-1), state", "self.critic(x).squeeze(-1), state")]
    },
    "one LSTM both losses train": {
        "edits": [("self.critic(hidden).squeeze(-1), state", "self.critic(hidden.detach()).squeeze(-1), state")]
    },
    "rewards scaled with --lstm": {"edits": [("envs = ScaleReward(envs, gamma=args.gamma)", "pass")]},
    "health warnings": {"edits": [("ess < 0.5,", "ess < 0.05,")]},
    "a NaN loss stops the run": {
        "edits": [("run.check_finite(loss, grad_norm)  # a NaN or infinite loss stops the run before its step", "pass")]
    },
    "exact resume": {"edits": [('torch.set_rng_state(state["rng"][0])', "pass")]},
    "data-parallel training with torchrun": {
        "edits": [
            (
                "n, total, squares = all_sum(sums)",
                "n, total, squares = sums",
            )
        ]
    },
    "data-parallel gradients": {
        "edits": [("average_gradients(params)  # under torchrun: the mean over the ranks, before clipping", "pass")]
    },
    "data-parallel normalization statistics": {"edits": [("(dist.get_world_size() - 1) * sums(old)", "0 * sums(old)")]},
    "envs in processes of their own": {"edits": [("        if self.pending:", "        if False:")]},
    "the real Atari score": {"edits": [("terminal_on_life_loss=False", "terminal_on_life_loss=True")]},
    "files that run no code": {
        "edits": [
            (
                'torch.load(path, map_location="cpu", weights_only=True)',
                'torch.load(path, map_location="cpu", weights_only=False)',
            )
        ]
    },
    "files written on a GPU load on a machine without one": {
        "edits": [('torch.load(path, map_location="cpu", weights_only=True)', "torch.load(path, weights_only=True)")]
    },
    "no host sync per minibatch": {
        "edits": [
            (
                "grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm)",
                "grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm, error_if_nonfinite=True)",
            )
        ]
    },
    "a run folder belongs to one run": {"edits": [("if not resuming and os.listdir(folder):", "if False:")]},
    "a finished run is never written again": {
        "edits": [('if has_finished(os.path.join("runs", saved.run_name)):', "if False:")]
    },
    "a resume goes on in its own folder": {"edits": [("if args.run_name not in (None, saved.run_name):", "if False:")]},
    "one live process per run folder": {"edits": [("fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass")]},
    "messages offer only what is on disk": {
        "edits": [
            (
                "            write_file(\n                path,",
                "            self.checkpoint_path = path\n            write_file(\n                path,",
            ),
            ("if os.path.isfile(checkpoint) and not has_finished(folder):", "if True:"),
        ]
    },
    "a shared file imports no module it names": {
        "edits": [('if ":" in saved.env_id and env_id is None:', "if False:")]
    },
    "a shared file's options are checked before they build anything": {
        "edits": [
            ('    check_shapes(shell, data["model"], what)\n', "\n"),
            ("if name in hints and not of_type(value, hints[name]):", "if False:"),
        ]
    },
    "the log writer's disk fault in one line, once": {
        "edits": [("            threading.excepthook = quiet_log_thread\n", "\n")]
    },
    "signals caught by a command-line run only": {"edits": [("CATCH_SIGNALS = False\n", "CATCH_SIGNALS = True\n")]},
    "a crash keeps what was learned": {"edits": [("self.checkpoint(after_crash=True)", "pass")]},
    "disk faults in one line": {"edits": [("            os.remove(tmp)", "            pass")]},
    "the env is blamed when it is at fault": {"edits": [("        if fault:", "        if False:")]},
    "a run that finished exits 0": {
        "edits": [("        if self.closing:\n            return", "        if False:\n            return")]
    },
    "options refused in one line": {"edits": [('"seed": (lambda v: 0 <= v < 2**31', '"seed": (lambda v: v < 2**31')]},
}
