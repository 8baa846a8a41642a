"""One rank of a data-parallel test run, started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dp_worker.py ppo_discrete OUT [options]

Trains through the script's own main() and writes what the rank ends with to OUT/rank<r>.pt, so that a
test can compare the ranks. Environment variables make one rank fail on purpose:
FAIL_RANK=<r> with FAIL_MODE=env (a bad --env-id on that rank only) or FAIL_MODE=update (an exception
in the middle of training, while the other ranks wait for its gradients). STOP_AT=<step> ends training
early (with the learning-rate schedule of the full run), as train(stop_at_step=...) does.
SAME_ACTIONS=1 takes the most likely action instead of sampling one (in ppo_continuous.py, the mean plus
half a std); FROZEN_STATS=1 keeps ppo_continuous.py's normalization statistics at their start. Without
torchrun, it trains as one plain process that writes OUT/rank0.pt.
"""

import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers import register_test_envs  # noqa: E402

register_test_envs()
module_name, out, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
ppo = importlib.import_module(module_name)
rank = int(os.environ.get("RANK", "0"))
if os.environ.get("SAME_ACTIONS"):  # the most likely action instead of a sample: the same actions as one process takes
    if hasattr(ppo, "sample"):  # the categorical scripts draw every action through sample()
        ppo.sample = lambda logits: logits.argmax(-1)
    else:  # ppo_continuous.py: the mean plus half a std (at the mean itself, the mean's policy gradient is 0)
        act = ppo.Agent.act

        def mean_plus_half_std(agent, obs, state=None, goes_on=True, deterministic=False):
            action, state = act(agent, obs, state, goes_on, True)
            return action + 0.5 * agent.actor_logstd.exp(), state

        ppo.Agent.act = mean_plus_half_std
if os.environ.get("FROZEN_STATS"):  # each rank's statistics would otherwise see only its own data until merged
    make_envs = ppo.make_envs

    def frozen(*args, **kwargs):
        envs = make_envs(*args, **kwargs)
        ppo.obs_normalizer(envs).update_running_mean = ppo.reward_normalizer(envs).update_running_mean = False
        return envs

    ppo.make_envs = frozen

if os.environ.get("FAIL_RANK") == str(rank):
    if os.environ["FAIL_MODE"] == "env":
        argv = argv + ["--env-id", "NoSuchEnv-v0"]
    else:
        average_gradients, calls = ppo.average_gradients, []

        def failing(params):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError(f"injected failure on rank {rank}")
            average_gradients(params)

        ppo.average_gradients = failing

train = ppo.train


def train_and_record(args, stop_at_step=None):
    stop = os.environ.get("STOP_AT")
    result = train(args, stop_at_step=int(stop) if stop else None)
    torch.save(
        {
            "model": result["agent"].state_dict(),
            "global_step": result["global_step"],
            "episodes": len(result["episodes"]["returns"]),
            "obs_rms": result["env_stats"].get("obs_rms"),
            "minibatch_size": args.batch_size // args.num_minibatches,
            "world_size": args.world_size,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    return result


ppo.train = train_and_record
ppo.exit_with(ppo.main(argv))
