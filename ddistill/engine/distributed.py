"""Process-group setup for every way ddistill is launched, and cross-rank agreement helpers.

Launchers and the environment they leave behind:

* ``torchrun`` / the ``deepspeed`` launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set
  (the deepspeed launcher also appends ``--local_rank=N`` to argv; the CLI accepts and ignores it).
* ``srun`` (SLURM, one task per GPU, as submitit does): only SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID /
  SLURM_JOB_NODELIST are set; we map them to the torch names, MASTER_ADDR = first host of the nodelist and
  MASTER_PORT = a port derived from the job id (identical on every rank and after a requeue).
* a plain ``python`` process: we set RANK=0, WORLD_SIZE=1, MASTER_ADDR=127.0.0.1 and a free port ourselves,
  because ``deepspeed.init_distributed`` otherwise falls into MPI discovery (mpi4py).

NCCL on GPU, gloo on CPU. On the CPU accelerator DeepSpeed's constructor JIT-compiles a shared-memory all-reduce op
(27-46 s of g++ on a fresh machine) that only AutoTP inference uses; we mark it incompatible before init.
Exit with ``barrier(); destroy_process_group()`` back to back (gloo aborts ~5 % of exits otherwise).
"""

from __future__ import annotations

import datetime
import itertools
import os
import random
import re
import socket
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "torch_env_from_slurm",
    "expand_nodelist",
    "init_distributed",
    "shutdown_distributed",
    "all_reduce_max_",
    "all_reduce_sum",
    "all_reduce_sum_",
    "LaggedAnyRank",
    "broadcast_object",
    "barrier",
]


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _expand_ranges(ranges: str) -> list[str]:
    """``01-03,7`` -> ["01", "02", "03", "7"] (zero padding kept from the range's first bound)."""
    values: list[str] = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        values += [lo] if not hi else [str(v).zfill(len(lo)) for v in range(int(lo), int(hi) + 1)]
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM nodelist such as ``gpu[01-03,7],login-a`` or ``a[1-2]b[3-4]`` into host names, in the
    order of ``scontrol show hostnames`` (no scontrol needed)."""
    hosts: list[str] = []
    for token in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        parts = [p for p in re.split(r"(\[[^\]]*\])", token) if p]
        choices = [_expand_ranges(p[1:-1]) if p.startswith("[") else [p] for p in parts]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    return hosts


def _job_port(job_id: str) -> int:
    return random.Random(job_id).randint(20000, 60000)


def torch_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables implied by an srun task's SLURM_* environment (already-set ones win)."""
    out: dict[str, str] = {}
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return out
    ntasks = environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS")
    if ntasks is None:
        raise ValueError("SLURM_PROCID is set but SLURM_NTASKS is not; launch with srun --ntasks")
    out["RANK"] = environ["SLURM_PROCID"]
    out["WORLD_SIZE"] = ntasks
    out["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        out["MASTER_ADDR"] = expand_nodelist(nodelist)[0] if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in environ:
        out["MASTER_PORT"] = str(_job_port(environ.get("SLURM_JOB_ID", "0")))
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fill_environment() -> None:
    os.environ.update(torch_env_from_slurm(os.environ))
    if "RANK" not in os.environ:  # a plain single process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")


def init_distributed(*, timeout_minutes: float = 30.0, device: str = "auto") -> DistEnv:
    """Initialise (or join the already initialised) process group; returns this rank's DistEnv.

    ``device``: "auto" (CUDA when available), "cuda" or "cpu".
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device={device!r}; allowed values: ['auto', 'cuda', 'cpu']")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but CUDA is not available")
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _fill_environment()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if get_accelerator()._name == "cpu":  # never probe this on the GPU box
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistEnv(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev, backend=backend
    )


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _multi_rank() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _reduce(values: list[float], op: dist.ReduceOp, device: torch.device) -> list[float]:
    if not _multi_rank():  # nothing to reduce: no device tensor, no host sync
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place element-wise max over ranks of a device tensor (no host sync)."""
    if _multi_rank():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place element-wise sum over ranks of a device tensor (no host sync)."""
    if _multi_rank():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    return _reduce(values, dist.ReduceOp.SUM, device)


class LaggedAnyRank:
    """Whether a host flag is set on any rank, agreed one call late so that no call drains the device queue.

    Call n writes the rank's value into a device tensor, all-reduces it (max) on the device, and copies the result
    into pinned host memory behind a CUDA event; it returns the agreed value of call n − 1, whose copy completed
    while call n's work was being queued (the wait is for that event only, not for the queue). Every rank gets the
    same answer at the same call. An all-reduce of the flag read back at once (a tensor made from host memory, then
    `.tolist()`) is, once per training step, a host sync that empties the queue: the GPU then idles while the host
    launches the next step's first small kernels. One rank: the local value at once (nothing to agree on)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.calls = device, 0
        pinned = device.type == "cuda"
        self._host = [torch.zeros(1, dtype=torch.float32, pin_memory=pinned) for _ in range(2)]
        self._events = [torch.cuda.Event() if pinned else None for _ in range(2)]

    def __call__(self, local: bool) -> bool:
        if not _multi_rank():
            return bool(local)
        slot = self.calls % 2
        flag = torch.full((1,), float(local), dtype=torch.float32, device=self.device)  # a fill: no host copy
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._host[slot].copy_(flag, non_blocking=self._events[slot] is not None)
        if self._events[slot] is not None:
            self._events[slot].record()
        self.calls += 1
        if self.calls == 1:
            return False
        previous = 1 - slot
        if self._events[previous] is not None:
            self._events[previous].synchronize()
        return bool(self._host[previous].item() > 0)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s Python object on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
