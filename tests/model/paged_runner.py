"""Drives our model the way the engine does: flat ragged batches over a paged cache with scattered blocks."""
import random

import torch

from model.dots1 import Dots1ForCausalLM
from model.forward_batch import ForwardBatch
from model.kv_cache import allocate_kv_cache


class PagedRunner:
    def __init__(self, model: Dots1ForCausalLM, num_blocks: int = 64, block_size: int = 4, seed: int = 0,
                 cache_dtype: torch.dtype | None = None):
        self.model = model
        self.block_size = block_size
        dtype = cache_dtype or model.embed_tokens.weight.dtype
        self.kv_caches = allocate_kv_cache(model.config, num_blocks, block_size, dtype, "cpu", model.parallel)
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)  # block tables come out non-contiguous and unordered
        self.block_tables: dict[int, list[int]] = {}
        self.num_cached: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]], all_logits: bool = False) -> list[torch.Tensor]:
        """Runs new tokens for several sequences in one batch; returns per sequence its logits ([n, V] or [V])."""
        seq_ids = list(chunks)
        for seq_id in seq_ids:
            table = self.block_tables.setdefault(seq_id, [])
            cached = self.num_cached.setdefault(seq_id, 0)
            while len(table) * self.block_size < cached + len(chunks[seq_id]):
                table.append(self.free_blocks.pop())
        logits_indices = None
        if all_logits:
            logits_indices = list(range(sum(len(chunks[s]) for s in seq_ids)))
        batch = ForwardBatch.build([chunks[s] for s in seq_ids], [self.num_cached[s] for s in seq_ids],
                                   [self.block_tables[s] for s in seq_ids], self.block_size, logits_indices)
        logits = self.model(batch, self.kv_caches)
        for seq_id in seq_ids:
            self.num_cached[seq_id] += len(chunks[seq_id])
        if not all_logits:
            return list(logits)
        return list(logits.split([len(chunks[s]) for s in seq_ids]))
