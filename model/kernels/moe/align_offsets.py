"""Align, stage 2 of 3: padded runs per expert, where each chunk's pairs start in them, and each block's expert.

Shapes: chunk_counts [C, BLOCK_E] int32 (stage 1) -> chunk_offsets [C, BLOCK_E] int32 (the sorted position of chunk c's
first pair of expert e: the start of e's run, padded to a multiple of BLOCK_M, plus e's pairs in earlier chunks),
block_expert [NB] int32 (the local expert owning rows b * BLOCK_M .., -1 past the padded total) and padded_total [1]
int32. One program: the per-expert totals are a BLOCK_E vector, chunks go by BLOCK_C rows at a time.
"""
import triton
import triton.language as tl


@triton.jit
def moe_align_offsets_kernel(chunk_counts_ptr, chunk_offsets_ptr, block_expert_ptr, padded_total_ptr,
                             num_chunks, num_blocks, NUM_EXPERTS: tl.constexpr, BLOCK_E: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for first in range(0, num_chunks, BLOCK_C):
        chunks = first + tl.arange(0, BLOCK_C)
        tile = tl.load(chunk_counts_ptr + chunks[:, None] * BLOCK_E + experts[None, :],
                       mask=chunks[:, None] < num_chunks, other=0)  # [BLOCK_C, BLOCK_E]
        counts += tl.sum(tile, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [BLOCK_E]
    padded_end = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    tl.store(padded_total_ptr, total)

    next_slot = padded_end - padded
    for first in range(0, num_chunks, BLOCK_C):
        chunks = first + tl.arange(0, BLOCK_C)
        in_range = chunks[:, None] < num_chunks
        offsets = chunk_counts_ptr + chunks[:, None] * BLOCK_E + experts[None, :]
        tile = tl.load(offsets, mask=in_range, other=0)
        starts = next_slot[None, :] + tl.cumsum(tile, axis=0) - tile
        tl.store(chunk_offsets_ptr + chunks[:, None] * BLOCK_E + experts[None, :], starts, mask=in_range)
        next_slot += tl.sum(tile, axis=0)

    for first in range(0, num_blocks, BLOCK_B):
        blocks = first + tl.arange(0, BLOCK_B)
        first_row = blocks * BLOCK_M
        # A block's expert is the number of experts whose padded runs end at or before its first row.
        before = (padded_end[None, :] <= first_row[:, None]) & (experts[None, :] < NUM_EXPERTS)
        expert = tl.where(first_row < total, tl.sum(before.to(tl.int32), axis=1), -1)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < num_blocks)
