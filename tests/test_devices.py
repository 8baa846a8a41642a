"""What a GPU changes, checked on the CPU: files written from CUDA tensors load on a machine without one, and the update
waits for the device only once per update, not once per minibatch. tests/test_gpu.py runs the rest on a GPU."""

import collections
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import load, same_params, tiny


# ----------------------------------------------------------------------------------------------------
# Files written on a GPU, read on a machine without one
# ----------------------------------------------------------------------------------------------------
def as_if_saved_on_a_gpu(path: str, out: str) -> None:
    """Write the file at path again as a run with --cuda on a GPU writes it: every tensor's storage tagged cuda:0 (what
    torch.save records of a CUDA tensor, and what torch.load restores it to unless told where), and --cuda set."""
    data = load(path)
    data["args"]["cuda"] = True
    tag = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        buffer = io.BytesIO()
        torch.save(data, buffer)
    finally:
        torch.serialization.location_tag = tag
    with open(out, "wb") as f:
        f.write(buffer.getvalue())


def test_a_checkpoint_and_an_agent_saved_on_a_gpu_load_on_a_machine_without_one(ppo, capsys):
    batch = tiny(ppo).batch_size
    straight = ppo.train(tiny(ppo, run_name="straight", total_timesteps=2 * batch))
    ppo.train(tiny(ppo, checkpoint_every=1, save_model=True, total_timesteps=2 * batch), stop_at_step=batch)
    as_if_saved_on_a_gpu("runs/tiny/checkpoint.pt", "gpu-checkpoint.pt")
    as_if_saved_on_a_gpu("runs/tiny/agent.pt", "gpu-agent.pt")
    if not torch.cuda.is_available():  # the files do claim a GPU: read where they were written, they need one
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load("gpu-agent.pt", weights_only=True)
    for path in ("gpu-agent.pt", "gpu-checkpoint.pt"):
        assert ppo.main(["--eval-checkpoint", path, "--eval-episodes", "1", "--no-cuda"]) == 0, capsys.readouterr().err
    # The resumed run takes the checkpoint's --cuda; where there is no GPU it trains on the CPU and ends as the
    # uninterrupted run did.
    assert ppo.main(["--resume", "gpu-checkpoint.pt", "--save-model"]) == 0, capsys.readouterr().err
    assert same_params(straight["agent"].state_dict(), load("runs/tiny/agent.pt")["model"])


# ----------------------------------------------------------------------------------------------------
# No host sync per minibatch
# ----------------------------------------------------------------------------------------------------
# On a GPU the host waits for the device wherever a value computed there must reach Python (.item(), bool(), float(),
# .tolist(), a copy to the CPU) or decides the size of a result (nonzero, indexing by a boolean mask). On the CPU those
# calls are free, so the test counts them instead of timing them.
SHAPE_FROM_DATA = {"nonzero", "masked_select", "_local_scalar_dense", "is_nonzero", "equal"}
TO_HOST = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


# --lstm: each LSTM's replay cuts its sequences at their episode ends (a nonzero, then read with .tolist()), and the
# update drops the steps that only reset an env (four boolean masks): the data decides those shapes, so each minibatch
# waits for the device up to 4 + 2 times the LSTMs (Atari's one; the actor's and the critic's in the other scripts).
def lstm_syncs_per_minibatch(ppo) -> int:
    return 4 + 2 * (1 if ppo.__name__ == "ppo_atari" else 2)


class HostSyncs(TorchDispatchMode):
    """Counts every torch op whose result the host must wait for, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SHAPE_FROM_DATA:
            self.counts[name] += 1
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.counts["boolean mask"] += 1
        return func(*args, **(kwargs or {}))


def host_syncs(ppo, monkeypatch, num_minibatches: int, **kw) -> collections.Counter:
    """The host syncs of a tiny run of one update."""
    args = tiny(ppo, run_name=f"syncs{num_minibatches}", num_minibatches=num_minibatches, **kw)
    args.total_timesteps = args.batch_size
    mode = HostSyncs()
    with monkeypatch.context() as m:
        for name in TO_HOST:  # Python-level calls that read a tensor's data without a dispatched op on the CPU
            method = getattr(torch.Tensor, name)

            def counted(self, *a, _method=method, _name=name, **k):
                mode.counts[_name] += 1
                return _method(self, *a, **k)

            m.setattr(torch.Tensor, name, counted)
        m.setattr(torch.cuda, "synchronize", lambda *a, **k: mode.counts.update(["synchronize"]))
        with mode:
            ppo.train(args)
    return mode.counts


@pytest.mark.parametrize("lstm", [False, True], ids=["feedforward", "lstm"])
def test_the_update_waits_for_the_device_once_per_update_not_per_minibatch(ppo, monkeypatch, lstm):
    # The same run with 2 and with 8 minibatches per epoch: only the update's inner loop runs more often.
    kw = dict(lstm=True, lstm_hidden_size=8) if lstm else {}
    few = host_syncs(ppo, monkeypatch, num_minibatches=2, **kw)
    many = host_syncs(ppo, monkeypatch, num_minibatches=8, **kw)
    assert sum(few.values()) > 0  # the counting works: the rollout's actions go to the host at every step
    extra = sum(many.values()) - sum(few.values())
    assert extra <= (8 - 2) * (lstm_syncs_per_minibatch(ppo) if lstm else 0), (few, many)
