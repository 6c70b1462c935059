"""Tiny random Dots1 checkpoints written by Transformers, and a driver that feeds executors ragged paged batches."""
import random
from pathlib import Path
from typing import Any

import torch
from random_dots1 import save_random_dots1

from model.forward_batch import ForwardBatch

TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=95, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-5,
    max_position_embeddings=128, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
)


def build_checkpoint(model_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    """Saves a random model (see ``save_random_dots1``) and returns its directory."""
    save_random_dots1(model_dir, {**TINY_CONFIG, **overrides}, seed)
    return model_dir


class PagedDriver:
    """Runs steps of new tokens for several sequences through ``execute`` over scattered KV blocks; returns the
    logits of every new token of every sequence."""

    def __init__(self, execute, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.execute = execute
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.num_cached: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        for seq_id, tokens in chunks.items():
            table = self.block_tables.setdefault(seq_id, [])
            cached = self.num_cached.setdefault(seq_id, 0)
            while len(table) * self.block_size < cached + len(tokens):
                table.append(self.free_blocks.pop())
        seq_ids = list(chunks)
        batch = ForwardBatch.build([chunks[s] for s in seq_ids], [self.num_cached[s] for s in seq_ids],
                                   [self.block_tables[s] for s in seq_ids], self.block_size,
                                   logits_indices=list(range(sum(len(t) for t in chunks.values()))))
        logits = self.execute(batch).cpu()
        for seq_id in seq_ids:
            self.num_cached[seq_id] += len(chunks[seq_id])
        return dict(zip(seq_ids, logits.split([len(chunks[s]) for s in seq_ids])))


def chunked_greedy_run(driver: PagedDriver, prompts: dict[int, list[int]], first_chunk: int,
                       decodes: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Prompts prefilled in two chunks (the second, with a cached prefix, batched with a decode of the sequences
    whose prompt already ended), then greedy decodes of all together. Returns (every logits row stacked, the greedy
    tokens per step)."""
    collected: list[torch.Tensor] = []
    tokens_per_step: list[list[int]] = []
    step = driver.step({seq: prompt[:first_chunk] for seq, prompt in prompts.items()})
    next_chunks: dict[int, list[int]] = {}
    for seq, prompt in prompts.items():
        collected.append(step[seq])
        rest = prompt[first_chunk:]
        next_chunks[seq] = rest if rest else [int(step[seq][-1].argmax())]
    for _ in range(decodes + 1):
        step = driver.step(next_chunks)
        collected.extend(step[seq] for seq in next_chunks)
        next_chunks = {seq: [int(logits[-1].argmax())] for seq, logits in step.items()}
        tokens_per_step.append([tokens[0] for tokens in next_chunks.values()])
    return torch.cat(collected), tokens_per_step
