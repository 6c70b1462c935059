"""Align, stage 1 of 3: each chunk of token-expert pairs counts its pairs per local expert.

Shapes: topk_ids [P] (flat [T, k], global expert ids) -> chunk_counts [C, BLOCK_E] int32, C = cdiv(P, CHUNK): row c
counts the pairs c * CHUNK .. (c + 1) * CHUNK - 1 per local expert (expert_start <= id < expert_start + E_local; other
ranks' pairs and columns past E_local count 0). Grid: (C,).
"""
import triton
import triton.language as tl


@triton.jit
def local_one_hot(topk_ids_ptr, pairs, num_pairs, expert_start, experts, NUM_EXPERTS: tl.constexpr):
    """[len(pairs), len(experts)] int32: 1 where a pair's local expert is that column."""
    in_range = pairs < num_pairs
    local = tl.load(topk_ids_ptr + pairs, mask=in_range, other=-1).to(tl.int32) - expert_start
    local = tl.where(in_range, local, -1)
    hit = (local[:, None] == experts[None, :]) & (experts[None, :] < NUM_EXPERTS)
    return hit.to(tl.int32)


@triton.jit
def moe_align_count_kernel(topk_ids_ptr, chunk_counts_ptr, num_pairs, expert_start,
                           NUM_EXPERTS: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
                           BLOCK_P: tl.constexpr):
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for first in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, num_pairs), BLOCK_P):
        pairs = first + tl.arange(0, BLOCK_P)
        counts += tl.sum(local_one_hot(topk_ids_ptr, pairs, num_pairs, expert_start, experts, NUM_EXPERTS), axis=0)
    tl.store(chunk_counts_ptr + chunk * BLOCK_E + experts, counts)
