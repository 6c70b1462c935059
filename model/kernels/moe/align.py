"""Align: token-expert pairs sorted by expert into runs padded to a multiple of BLOCK_M, all on the device.

Inputs: topk_ids [T, k] (global expert ids). The pairs are the flat indices p = t * k + j of topk_ids. Only pairs of
this rank's experts (expert_start <= id < expert_start + E_local) are placed; the others are dropped.

Outputs (sizes known on the host, so nothing is read back):
- sorted_pair_ids [S] int32, S = P + min(E_local, P) * (BLOCK_M - 1) rounded up to BLOCK_M: each local expert's
  pairs in order, its run padded to a multiple of BLOCK_M with the sentinel P; everything past the padded total
  is P too.
- block_expert [S / BLOCK_M] int32: the local expert of each BLOCK_M block of sorted_pair_ids, -1 past the total.
- padded_total [1] int32: the real padded length (the sum over local experts of their padded runs).

One program does it all: experts are a BLOCK_E-wide vector, pairs go by in chunks of BLOCK_P, and a [BLOCK_P, BLOCK_E]
one-hot tile gives counts (its column sums) and each pair's rank among its expert's earlier pairs (its cumsum).
"""
import torch
import triton
import triton.language as tl

ALIGN_PAIR_CHUNK = 32
ALIGN_BLOCK_CHUNK = 64


def sorted_length_bound(num_pairs: int, num_local_experts: int, block_m: int) -> int:
    """The host bound on the padded total: only experts that got pairs pad, and each pads fewer than BLOCK_M."""
    return num_pairs + min(num_local_experts, num_pairs) * (block_m - 1)


@triton.jit
def _one_hot(topk_ids_ptr, pairs, num_pairs, expert_start, experts, NUM_EXPERTS: tl.constexpr):
    """[BLOCK_P, BLOCK_E] int32: 1 where a pair's local expert is that column."""
    local = tl.load(topk_ids_ptr + pairs, mask=pairs < num_pairs, other=-1).to(tl.int32) - expert_start
    local = tl.where(pairs < num_pairs, local, -1)
    hit = (local[:, None] == experts[None, :]) & (experts[None, :] < NUM_EXPERTS)
    return hit.to(tl.int32)


@triton.jit
def moe_align_kernel(topk_ids_ptr, sorted_pair_ids_ptr, block_expert_ptr, padded_total_ptr,
                     num_pairs, expert_start, num_blocks,
                     NUM_EXPERTS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_pairs, BLOCK_P):
        pairs = start + tl.arange(0, BLOCK_P)
        counts += tl.sum(_one_hot(topk_ids_ptr, pairs, num_pairs, expert_start, experts, NUM_EXPERTS), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [BLOCK_E]
    padded_end = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    tl.store(padded_total_ptr, total)

    next_slot = padded_end - padded  # [BLOCK_E] where each expert's next pair goes
    for start in range(0, num_pairs, BLOCK_P):
        pairs = start + tl.arange(0, BLOCK_P)
        hit = _one_hot(topk_ids_ptr, pairs, num_pairs, expert_start, experts, NUM_EXPERTS)  # [BLOCK_P, BLOCK_E]
        earlier = tl.cumsum(hit, axis=0) - hit  # pairs of the same expert before this one in the chunk
        slot = tl.sum(hit * (next_slot[None, :] + earlier), axis=1)  # [BLOCK_P]
        is_local = tl.sum(hit, axis=1) > 0
        tl.store(sorted_pair_ids_ptr + slot, pairs.to(tl.int32), mask=is_local)
        next_slot += tl.sum(hit, axis=0)

    for start in range(0, num_blocks, BLOCK_B):
        blocks = start + tl.arange(0, BLOCK_B)
        first_row = blocks * BLOCK_M
        # The block's expert is the number of experts whose padded runs end at or before its first row.
        before = (padded_end[None, :] <= first_row[:, None]) & (experts[None, :] < NUM_EXPERTS)
        expert = tl.sum(before.to(tl.int32), axis=1)
        expert = tl.where(first_row < total, expert, -1)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < num_blocks)


def moe_align(topk_ids: torch.Tensor, num_local_experts: int, block_m: int,
              expert_start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_pair_ids [S] int32, block_expert [S / block_m] int32, padded_total [1] int32)."""
    num_pairs = topk_ids.numel()
    bound = sorted_length_bound(num_pairs, num_local_experts, block_m)
    num_blocks = triton.cdiv(bound, block_m)
    sorted_pair_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=topk_ids.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=topk_ids.device)
    padded_total = torch.empty(1, dtype=torch.int32, device=topk_ids.device)
    moe_align_kernel[(1,)](
        topk_ids.contiguous(), sorted_pair_ids, block_expert, padded_total, num_pairs, expert_start, num_blocks,
        NUM_EXPERTS=num_local_experts, BLOCK_E=triton.next_power_of_2(num_local_experts), BLOCK_M=block_m,
        BLOCK_P=ALIGN_PAIR_CHUNK, BLOCK_B=ALIGN_BLOCK_CHUNK)
    return sorted_pair_ids, block_expert, padded_total
