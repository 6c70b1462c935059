"""Align, stage 3 of 3: every local pair written to its sorted position.

Shapes: topk_ids [P], chunk_offsets [C, BLOCK_E] int32 (stage 2) -> sorted_pair_ids [S] int32 (pre-filled with the
sentinel P, so padding and the tail keep it). Within a chunk a pair's position is its chunk's offset for its expert
plus the number of earlier pairs of that expert in the chunk (a cumsum of the one-hot tile), so the order is that
of the pairs: deterministic. Grid: (C,).
"""
import triton
import triton.language as tl

from model.kernels.moe.align_count import local_one_hot


@triton.jit
def moe_align_scatter_kernel(topk_ids_ptr, chunk_offsets_ptr, sorted_pair_ids_ptr, num_pairs, expert_start,
                             NUM_EXPERTS: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
                             BLOCK_P: tl.constexpr):
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    next_slot = tl.load(chunk_offsets_ptr + chunk * BLOCK_E + experts)  # [BLOCK_E]
    for first in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, num_pairs), BLOCK_P):
        pairs = first + tl.arange(0, BLOCK_P)
        hit = local_one_hot(topk_ids_ptr, pairs, num_pairs, expert_start, experts, NUM_EXPERTS)  # [BLOCK_P, BLOCK_E]
        earlier = tl.cumsum(hit, axis=0) - hit
        slot = tl.sum(hit * (next_slot[None, :] + earlier), axis=1)  # [BLOCK_P]
        tl.store(sorted_pair_ids_ptr + slot, pairs.to(tl.int32), mask=tl.sum(hit, axis=1) > 0)
        next_slot += tl.sum(hit, axis=0)
