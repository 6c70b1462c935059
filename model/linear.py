"""Projection layers that know their tensor-parallel shard and slice full checkpoint tensors for it."""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from model.parallel import ParallelState
from model.weights import CheckpointTensor, WeightTarget


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across ranks.

    ``output_sizes`` lists checkpoint matrices stacked along the output (q/k/v, or gate/up) so one matmul computes
    them all; each is split across ranks on its own, so every rank holds its part of each. ``shards`` gives each
    matrix's (first row, rows) on this rank instead of an equal split (replicated kv heads).
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, parallel: ParallelState,
                 dtype: torch.dtype, names: list[str] | None = None,
                 shards: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = output_sizes
        self.parallel = parallel
        self.shards = shards or [parallel.shard(size, f"output size of {name}")
                                 for size, name in zip(output_sizes, names or ["a projection"] * len(output_sizes))]
        self.local_sizes = [size for _, size in self.shards]
        self.weight = nn.Parameter(torch.empty(sum(self.local_sizes), input_size, dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(sum(self.local_sizes), dtype=dtype), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def weight_loader(self, param: nn.Parameter, source: CheckpointTensor, shard_id: int = 0) -> None:
        start, size = self.shards[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        param.data[offset:offset + size].copy_(source.read(slice(start, start + size)))

    def weight_targets(self, prefixes: list[str]) -> dict[str, WeightTarget]:
        """Checkpoint keys ``{prefix}.weight`` (and ``.bias``) for each stacked matrix, in ``output_sizes`` order."""
        targets = {}
        for shard_id, (prefix, size) in enumerate(zip(prefixes, self.output_sizes, strict=True)):
            key = f"{prefix}.weight"
            targets[key] = WeightTarget((size, self.input_size), partial(self.weight_loader, self.weight,
                                                                         shard_id=shard_id), (key,))
            if self.bias is not None:
                key = f"{prefix}.bias"
                targets[key] = WeightTarget((size,), partial(self.weight_loader, self.bias, shard_id=shard_id), (key,))
        return targets


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split across ranks; partial sums are all-reduced, then b is added."""

    def __init__(self, input_size: int, output_size: int, bias: bool, parallel: ParallelState, dtype: torch.dtype,
                 name: str = "a projection", reduce_output: bool = True) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.parallel = parallel
        self.reduce_output = reduce_output
        self.input_start, self.local_input_size = parallel.shard(input_size, f"input size of {name}")
        self.weight = nn.Parameter(torch.empty(output_size, self.local_input_size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.reduce_output:
            y = self.parallel.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def weight_loader(self, param: nn.Parameter, source: CheckpointTensor) -> None:
        if param is self.bias:
            param.data.copy_(source.read())
            return
        end = self.input_start + self.local_input_size
        param.data.copy_(source.read(slice(None), slice(self.input_start, end)))

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        key = f"{prefix}.weight"
        targets = {key: WeightTarget((self.output_size, self.input_size), partial(self.weight_loader, self.weight),
                                     (key,))}
        if self.bias is not None:
            key = f"{prefix}.bias"
            targets[key] = WeightTarget((self.output_size,), partial(self.weight_loader, self.bias), (key,))
        return targets
