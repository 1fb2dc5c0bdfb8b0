"""Processes and randomness: this process's place in a torchrun job, its device, and the seeds of each epoch."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .._env import pick_device


@dataclass
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun) and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> DistEnv:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, local_world, dev)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the global RNGs (dropout, mixup) at the start of an epoch: resuming needs nothing else."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**63


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's BatchNorm statistics to every process (each updates its own during training)."""
    for buf in module.buffers():
        dist.broadcast(buf, 0)
