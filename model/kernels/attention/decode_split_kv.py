"""Decode attention, split-KV ("flash-decoding"): each sequence's context is cut into splits attended in parallel.

    query                   [B, Hq, D]    one new token per sequence
    key_cache, value_cache  [num_blocks, block_size, Hkv, D]  (float8_e4m3fn: dequantized on load with the scale)
    block_tables            [B, W] int32  read on the device; entries past a sequence's blocks are never read
    context_lens            [B] int32     keys per sequence (0 for a padded row: its splits come out empty)
    partial_out             [B, Hq, S, D] fp32, each split's softmax-normalised output
    partial_lse             [B, Hq, S] fp32, each split's log2-sum-exp of scores (-inf when it saw no key)
    output                  [B, Hq, D]    the query dtype, written here directly when S == 1
    grid                    (B, Hq, S)    S = num_splits from ``plan_splits``, host-known bounds only

A program owns one (sequence, query head, split) and walks its split in tiles of BLOCK_N keys that may span
several cache blocks. With S > 1, ``decode_reduce`` combines the splits into the output. A sequence with no keys
(a padded row) gets zeros.
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_SPLITS = 16
MIN_SPLIT_TOKENS = 256
TARGET_PROGRAMS = 1024  # enough (sequence, head, split) programs to fill a large GPU
BLOCK_N = 32  # with NUM_WARPS, no register spills at head_dim 128 on sm_90 (bench/compile_attention_kernels.py)
NUM_WARPS = 8


def plan_splits(num_seqs: int, num_heads: int, max_context: int) -> tuple[int, int]:
    """(num_splits, tokens per split) from host-known bounds: the batch size, heads and the block table's capacity."""
    wanted = max(1, -(-TARGET_PROGRAMS // max(1, num_seqs * num_heads)))
    most_useful = max(1, -(-max_context // MIN_SPLIT_TOKENS))
    num_splits = min(MAX_SPLITS, wanted, most_useful)
    split_tokens = -(-max(1, max_context) // num_splits)
    split_tokens = -(-split_tokens // BLOCK_N) * BLOCK_N
    return num_splits, split_tokens


@triton.jit(do_not_specialize=["window", "split_tokens"])
def _decode_split_kv_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, context_lens_ptr, partial_out_ptr, partial_lse_ptr,
    output_ptr, scale_log2, k_scale, v_scale, window, split_tokens,
    stride_qt, stride_qh, stride_cache_block, stride_cache_token, stride_cache_head, stride_table,
    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, SLIDING: tl.constexpr, DEQUANTIZE: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    kv_head = head // GROUP
    context_len = tl.load(context_lens_ptr + seq)
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, context_len)
    if SLIDING:
        start = tl.maximum(start, context_len - window)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    query = tl.load(query_ptr + seq * stride_qt + head * stride_qh + dims, mask=dim_mask, other=0.0)
    query = query.to(tl.float32) * scale_log2  # [BLOCK_D]
    running_max = tl.full([1], float("-inf"), tl.float32)
    running_sum = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        valid = positions < end
        block_ids = tl.load(block_tables_ptr + seq * stride_table + positions // BLOCK_SIZE, mask=valid, other=0)
        token_offsets = block_ids.to(tl.int64) * stride_cache_block + (positions % BLOCK_SIZE) * stride_cache_token
        offsets = token_offsets[:, None] + kv_head * stride_cache_head + dims[None, :]  # [BLOCK_N, BLOCK_D]
        kv_mask = valid[:, None] & dim_mask[None, :]
        keys = tl.load(key_cache_ptr + offsets, mask=kv_mask, other=0.0).to(tl.float32)
        if DEQUANTIZE:
            keys = keys * k_scale
        scores = tl.sum(query[None, :] * keys, axis=1)  # [BLOCK_N]
        scores = tl.where(valid, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))  # finite: every tile holds a valid key
        probs = tl.exp2(scores - new_max)  # [BLOCK_N]
        alpha = tl.exp2(running_max - new_max)
        values = tl.load(value_cache_ptr + offsets, mask=kv_mask, other=0.0).to(tl.float32)
        if DEQUANTIZE:
            values = values * v_scale
        running_sum = running_sum * alpha + tl.sum(probs, axis=0)
        acc = acc * alpha + tl.sum(probs[:, None] * values, axis=0)
        running_max = new_max
    has_keys = running_sum > 0
    safe_sum = tl.where(has_keys, running_sum, 1.0)
    out = acc / safe_sum  # [BLOCK_D]
    if SINGLE_SPLIT:
        tl.store(output_ptr + seq * stride_ot + head * stride_oh + dims, out.to(output_ptr.dtype.element_ty),
                 mask=dim_mask)
    else:
        lse = tl.where(has_keys, running_max + tl.log2(safe_sum), float("-inf"))
        tl.store(partial_out_ptr + seq * stride_pt + head * stride_ph + split * stride_ps + dims, out, mask=dim_mask)
        tl.store(partial_lse_ptr + seq * stride_lt + head * stride_lh + split + tl.arange(0, 1), lse)


def decode_split_kv(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor, output: torch.Tensor,
                    partial_out: torch.Tensor, partial_lse: torch.Tensor, split_tokens: int, scale: float,
                    window: int | None, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """For queries [B, Hq, D]: output [B, Hq, D] when partial_out [B, Hq, S, D] has S == 1, else partial_out and
    partial_lse [B, Hq, S] for ``decode_reduce``."""
    num_seqs, num_heads, head_dim = query.shape
    num_splits = partial_out.shape[2]
    assert query.stride(2) == 1 and key_cache.stride(3) == 1 and key_cache.stride() == value_cache.stride()
    assert partial_lse.stride(2) == 1 and partial_out.stride(3) == 1 and block_tables.stride(1) == 1
    assert output.stride(2) == 1
    _decode_split_kv_kernel[(num_seqs, num_heads, num_splits)](
        query, key_cache, value_cache, block_tables, context_lens, partial_out, partial_lse, output,
        scale * LOG2E, float(k_scale), float(v_scale), window or 0, split_tokens,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2), partial_lse.stride(0),
        partial_lse.stride(1), output.stride(0), output.stride(1),
        GROUP=num_heads // key_cache.shape[2], BLOCK_SIZE=key_cache.shape[1], BLOCK_N=BLOCK_N, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), SLIDING=window is not None,
        DEQUANTIZE=key_cache.dtype == torch.float8_e4m3fn, SINGLE_SPLIT=num_splits == 1, num_warps=NUM_WARPS,
    )
