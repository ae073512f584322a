"""Process-group helpers for DDP through torchrun (or any launcher that sets the env vars).

``init_distributed()`` reads RANK / WORLD_SIZE / LOCAL_RANK and starts the process group with
``gloo`` on CPU and ``nccl`` on CUDA. Without those variables it is a no-op (world size 1). A
process group the caller has already started is used as it is: rank and world size come from it,
and ``cleanup()`` leaves it for the caller to destroy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# True while the default process group is one that init_distributed() started.
_started_here = False

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: str | None = None) -> int:
    text = os.environ.get(name, default)
    try:
        return int(text)
    except (TypeError, ValueError):
        raise RuntimeError(f"fmn: environment variable {name} must be an integer; got {text!r}") from None


def init_distributed(device_type: str = "cpu") -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return current()
    world = _env_int("WORLD_SIZE", "1")
    if world < 1:
        raise RuntimeError(f"fmn: WORLD_SIZE must be >= 1; got {world}")
    if world == 1:
        return DistInfo()
    if "RANK" not in os.environ:
        raise RuntimeError(
            f"fmn: WORLD_SIZE={world} but RANK is not set; start multi-process training with torchrun "
            "(e.g. torchrun --nproc_per_node=N -m fmn.cli train ...), which sets RANK, LOCAL_RANK and "
            "MASTER_ADDR/MASTER_PORT")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", str(rank))
    if not 0 <= rank < world:
        raise RuntimeError(f"fmn: RANK={rank} is outside [0, WORLD_SIZE={world})")
    if local_rank < 0:
        raise RuntimeError(f"fmn: LOCAL_RANK must be >= 0; got {local_rank}")
    if not dist.is_available():
        raise RuntimeError(f"fmn: WORLD_SIZE={world} but this torch build has no torch.distributed")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        _check_cuda_device(local_rank)
        torch.cuda.set_device(local_rank)
    global _started_here
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    _started_here = True
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def _check_cuda_device(local_rank: int) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("fmn: distributed training on device cuda, but CUDA is not available")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"fmn: LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                           "device(s) are visible")


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", str(dist.get_rank())))
    return DistInfo()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def cleanup() -> None:
    """Destroy the process group if init_distributed() started it; a caller's group is left alone."""
    global _started_here
    if _started_here and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _started_here = False
