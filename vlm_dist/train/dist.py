"""Process-group set-up for every way the trainer is started, and small collective helpers.

- `deepspeed --num_gpus N --module vlm_dist.train` and `torchrun` set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*.
- A plain `python -m vlm_dist.train` sets nothing: we fill in a world of one, so DeepSpeed does not
  fall back to MPI discovery (which fails without mpi4py).
Backend: NCCL on GPUs, gloo on CPUs (DeepSpeed's CPU accelerator would otherwise ask for oneCCL).
The start-up itself (`init_distributed`) goes through DeepSpeed and so lives in train/engine.py; this
module uses torch.distributed only.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def shutdown() -> None:
    """Tear the process group down before the interpreter exits, on the paths every rank reaches together
    (a finished run, a stop, an error all ranks agreed on). Left to interpreter shutdown, a gloo thread can
    still be joinable when its destructor runs, and the rank dies by SIGABRT ("terminate called without
    an active exception") instead of returning its exit code: seen once in CI on a rank leaving with 2."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on loopback now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a small vector of numbers over all ranks (float64, so counts and sums stay exact)."""
    t = torch.as_tensor(values, dtype=torch.float64).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.cpu()


_HOST_GROUP: list = []  # [the gloo group for host numbers], made on first use


def _host_group():
    """None (the default group) when it reduces CPU tensors (gloo, or a cpu:gloo multi-backend); else a
    gloo group over all ranks, made once (every rank reaches the first call at the same step)."""
    if "gloo" in str(dist.get_backend()):
        return None
    if not _HOST_GROUP:
        _HOST_GROUP.append(dist.new_group(backend="gloo"))
    return _HOST_GROUP[0]


def all_reduce_sum_host(values: list[float]) -> torch.Tensor:
    """all_reduce_sum for numbers that live on the host (counts, flags), over gloo: it never waits for
    the device, so the training step can run on without a host sync."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, group=_host_group())
    return t


def from_main(obj):
    """Rank 0's `obj` on every rank (a small object of our own: broadcast_object_list pickles it)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
