"""Align: token-expert pairs sorted by expert into runs padded to a multiple of BLOCK_M, on the device, in three
launches (count per chunk, offsets, scatter), each sized from host-known shapes.

Inputs: topk_ids [T, k] (global expert ids). The pairs are the flat indices p = t * k + j of topk_ids. Only pairs of
this rank's experts (expert_start <= id < expert_start + E_local) are placed; the others are dropped.

Outputs:
- sorted_pair_ids [S] int32, S = P + min(E_local, P) * (BLOCK_M - 1) rounded up to BLOCK_M: each local expert's
  pairs in order, its run padded to a multiple of BLOCK_M with the sentinel P; everything past the padded total
  is P too;
- block_expert [S / BLOCK_M] int32: the local expert of each BLOCK_M block of sorted_pair_ids, -1 past the total;
- padded_total [1] int32: the real padded length (the sum over local experts of their padded runs).
"""
import torch
import triton

from model.kernels.moe.align_count import moe_align_count_kernel
from model.kernels.moe.align_offsets import moe_align_offsets_kernel
from model.kernels.moe.align_scatter import moe_align_scatter_kernel

CHUNK_PAIRS = 256  # pairs per program of the count and scatter stages
PAIR_TILE = 32  # pairs per one-hot tile inside a chunk
CHUNK_TILE = 16  # chunks per tile of the offsets stage
BLOCK_TILE = 64  # blocks per tile when labelling blocks with experts


def sorted_length_bound(num_pairs: int, num_local_experts: int, block_m: int) -> int:
    """The host bound on the padded total: only experts that got pairs pad, and each pads fewer than BLOCK_M."""
    return num_pairs + min(num_local_experts, num_pairs) * (block_m - 1)


def moe_align(topk_ids: torch.Tensor, num_local_experts: int, block_m: int, expert_start: int = 0,
              chunk_pairs: int = CHUNK_PAIRS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_pair_ids [S] int32, block_expert [S / block_m] int32, padded_total [1] int32)."""
    if chunk_pairs % PAIR_TILE:
        raise ValueError(f"chunk_pairs ({chunk_pairs}) must be a multiple of {PAIR_TILE}")
    device = topk_ids.device
    flat_ids = topk_ids.reshape(-1).contiguous()
    num_pairs = flat_ids.numel()
    num_blocks = triton.cdiv(sorted_length_bound(num_pairs, num_local_experts, block_m), block_m)
    num_chunks = triton.cdiv(num_pairs, chunk_pairs)
    block_e = triton.next_power_of_2(num_local_experts)
    sorted_pair_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    padded_total = torch.empty(1, dtype=torch.int32, device=device)
    chunk_counts = torch.empty(num_chunks, block_e, dtype=torch.int32, device=device)
    chunk_offsets = torch.empty(num_chunks, block_e, dtype=torch.int32, device=device)
    experts = dict(NUM_EXPERTS=num_local_experts, BLOCK_E=block_e)
    moe_align_count_kernel[(num_chunks,)](flat_ids, chunk_counts, num_pairs, expert_start, **experts,
                                          CHUNK=chunk_pairs, BLOCK_P=PAIR_TILE)
    moe_align_offsets_kernel[(1,)](chunk_counts, chunk_offsets, block_expert, padded_total, num_chunks, num_blocks,
                                   **experts, BLOCK_M=block_m, BLOCK_C=CHUNK_TILE, BLOCK_B=BLOCK_TILE)
    moe_align_scatter_kernel[(num_chunks,)](flat_ids, chunk_offsets, sorted_pair_ids, num_pairs, expert_start,
                                            **experts, CHUNK=chunk_pairs, BLOCK_P=PAIR_TILE)
    return sorted_pair_ids, block_expert, padded_total
