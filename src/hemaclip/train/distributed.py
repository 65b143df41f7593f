"""Single-process or torchrun/DDP execution, chosen from the environment torchrun sets."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, how many there are, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' uses CUDA when present (one GPU per local rank), else the CPU."""
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(requested)


def init_distributed(requested_device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU); else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> float:
    """The mean of a scalar over all ranks (for logging a loss that is the same as one process's)."""
    if not info.distributed:
        return float(value)
    reduced = value.detach().clone().float()
    dist.all_reduce(reduced)
    return float(reduced) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
