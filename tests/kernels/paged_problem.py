"""Random paged-attention problems: a ragged batch over a cache with shuffled blocks, run through one backend."""
import random
from dataclasses import dataclass

import torch

from model.attention_backend import AttentionBackend
from model.forward_batch import ForwardBatch
from model.kv_cache import FP8_KV_DTYPE, quantize_kv


@dataclass
class Layer:
    scale: float
    window: int | None = None
    k_scale: float = 1.0
    v_scale: float = 1.0


@dataclass
class Problem:
    batch: ForwardBatch
    query: torch.Tensor  # [T, Hq, D] float32
    key: torch.Tensor  # [T, Hkv, D]
    value: torch.Tensor
    history: tuple[torch.Tensor, torch.Tensor]  # float32 caches [N, bs, Hkv, D] holding every cached prefix

    @property
    def block_size(self) -> int:
        return self.history[0].shape[1]


def make_problem(cached: list[int], new: list[int], block_size: int, num_heads: int, num_kv_heads: int,
                 head_dim: int = 16, seed: int = 0, spare_blocks: int = 3, table_width: int | None = None) -> Problem:
    """Sequence i has cached[i] tokens in the cache and new[i] new ones; its blocks are scattered over the cache.

    ``table_width`` pads every block table with zeros to that many entries (a CUDA-graph runner's fixed width)."""
    generator = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-(c + n) // block_size) for c, n in zip(cached, new)]
    num_blocks = sum(blocks_needed) + spare_blocks
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    tables = []
    for count in blocks_needed:
        tables.append(free[:count])
        free = free[count:]
    batch = ForwardBatch.build([[0] * n for n in new], cached, tables, block_size)
    if table_width is not None:
        wide = torch.zeros(len(tables), table_width, dtype=torch.int32)
        wide[:, :batch.block_tables.shape[1]] = batch.block_tables
        batch.block_tables = wide
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    history = (torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
    num_tokens = sum(new)
    return Problem(batch, torch.randn(num_tokens, num_heads, head_dim, generator=generator),
                   torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator),
                   torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator), history)


def run(backend: AttentionBackend, problem: Problem, layer: Layer, dtype: torch.dtype = torch.float32,
        cache_dtype: torch.dtype | None = None, batch: ForwardBatch | None = None, caches=None
        ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Stores the new keys/values and attends: (output [T, Hq, D] float32, the caches written).

    Runs on a fresh copy of the history unless ``caches`` are given (to continue a sequence step by step)."""
    cache_dtype = cache_dtype or dtype
    if caches is None:
        caches = tuple(to_cache(h, cache_dtype, s) for h, s in zip(problem.history, (layer.k_scale, layer.v_scale)))
    batch = batch or problem.batch
    metadata = backend.build_metadata(batch, problem.block_size)
    out = backend.forward(layer, problem.query.to(dtype), problem.key.to(dtype), problem.value.to(dtype), *caches,
                          metadata)
    return out.float(), caches


def to_cache(history: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return quantize_kv(history, scale) if dtype == FP8_KV_DTYPE else history.to(dtype, copy=True)


def slice_problem(problem: Problem, cached: list[int], new: list[int], token_rows: slice) -> Problem:
    """The same sequences and cache with other lengths and a slice of the new tokens (for chunked prefill)."""
    tables = [problem.batch.block_tables[i].tolist() for i in range(len(cached))]
    batch = ForwardBatch.build([[0] * n for n in new], cached, tables, problem.block_size)
    return Problem(batch, problem.query[token_rows], problem.key[token_rows], problem.value[token_rows],
                   problem.history)
