"""Which shard of the model this process holds, and the collectives that join the shards back together.

At world_size 1 every collective is a no-op, so the single-process path pays nothing for being parallel-ready.
"""
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # a torch.distributed process group; None means the default group
    expert_parallel: bool = False  # shard MoE layers by whole experts instead of by expert intermediate size

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"invalid parallel state: rank {self.rank} of world size {self.world_size}")

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def shard(self, total: int, what: str) -> tuple[int, int]:
        """(start, size) of this rank's equal part of ``total`` items; ``what`` names them in the error."""
        if total % self.world_size:
            raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel world size ({self.world_size})")
        size = total // self.world_size
        return self.rank * size, size

    def shard_heads(self, total: int, what: str) -> tuple[int, int]:
        """(first head, heads) of this rank; with fewer heads than ranks each head is replicated on
        ``world_size // total`` consecutive ranks, so a rank holds the one head its query heads share."""
        if total >= self.world_size:
            return self.shard(total, what)
        if self.world_size % total:
            raise ValueError(f"{what} ({total}) must divide or be divisible by the tensor-parallel world size "
                             f"({self.world_size})")
        return self.rank * total // self.world_size, 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over ranks in place."""
        if self.is_parallel:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates every rank's ``tensor`` along ``dim`` in rank order."""
        if not self.is_parallel:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)
