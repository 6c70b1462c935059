"""Attention for a flat ragged batch over the paged KV cache: prefills, chunked prefills over a cached prefix,
decodes, or any mix of them, in one launch.

    query                   [T, Hq, D]    the new tokens of every sequence, laid end to end
    key_cache, value_cache  [num_blocks, block_size, Hkv, D]  already holding this step's keys/values
                            (float8_e4m3fn: dequantized on load with the scale)
    block_tables            [B, W] int32
    query_start_loc         [B + 1] int32 sequence i owns tokens query_start_loc[i]:query_start_loc[i + 1]
    context_lens            [B] int32     keys of sequence i once this step's are written (prefix + new)
    output                  [T, Hq, D]    the query dtype
    grid                    (T // BLOCK_M + B, Hq)

Sequence i's query tiles are numbered from ``query_start_loc[i] // BLOCK_M + i``; that bound needs only host-known
T and B, and a program finds its sequence by binary search and exits when its tile lies past the sequence's
queries. Queries see keys causally (the new token at local index j sits at position context_len - query_len + j),
within the layer's sliding window if it has one. Keys are walked in tiles of BLOCK_N that may span cache blocks.
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def tiles_for(max_query_len: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): the largest tiles that compile for sm_90 at head_dim 128 without spilling
    registers (bench/compile_attention_kernels.py); small query tiles when every sequence brings few tokens."""
    return (16, 32, 4) if max_query_len <= 16 else (64, 64, 8)


@triton.jit(do_not_specialize=["num_seqs"])  # a new batch size must not recompile
def _varlen_attention_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, query_start_loc_ptr, context_lens_ptr, output_ptr,
    scale_log2, k_scale, v_scale, window, num_seqs,
    stride_qt, stride_qh, stride_cache_block, stride_cache_token, stride_cache_head, stride_table,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SLIDING: tl.constexpr, DEQUANTIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    low = 0
    high = num_seqs
    while low + 1 < high:  # the last sequence whose first tile number is <= tile
        middle = (low + high) // 2
        first_tile = tl.load(query_start_loc_ptr + middle) // BLOCK_M + middle
        if first_tile <= tile:
            low = middle
        else:
            high = middle
    seq = low
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    local_tile = tile - (query_start // BLOCK_M + seq)
    if local_tile * BLOCK_M >= query_len:
        return
    context_len = tl.load(context_lens_ptr + seq)
    prefix_len = context_len - query_len
    rows = local_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] local query indices
    row_mask = rows < query_len
    query_positions = prefix_len + rows
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    query_offsets = (query_start + rows)[:, None].to(tl.int64) * stride_qt + head * stride_qh + dims[None, :]
    query = tl.load(query_ptr + query_offsets, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # [M, D]
    key_end = tl.minimum(prefix_len + tl.minimum((local_tile + 1) * BLOCK_M, query_len), context_len)
    key_start = 0
    if SLIDING:
        key_start = tl.maximum(prefix_len + local_tile * BLOCK_M - window + 1, 0)
    key_start = (key_start // BLOCK_N) * BLOCK_N
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for tile_start in range(key_start, key_end, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        valid = positions < key_end
        block_ids = tl.load(block_tables_ptr + seq * stride_table + positions // BLOCK_SIZE, mask=valid, other=0)
        token_offsets = block_ids.to(tl.int64) * stride_cache_block + (positions % BLOCK_SIZE) * stride_cache_token
        offsets = token_offsets[:, None] + kv_head * stride_cache_head + dims[None, :]  # [BLOCK_N, BLOCK_D]
        kv_mask = valid[:, None] & dim_mask[None, :]
        keys = tl.load(key_cache_ptr + offsets, mask=kv_mask, other=0.0)
        if DEQUANTIZE:
            keys = keys.to(tl.float32) * k_scale
        scores = tl.dot(query, tl.trans(keys.to(query.dtype)), input_precision=DOT_PRECISION) * scale_log2  # [M, N]
        visible = (positions[None, :] <= query_positions[:, None]) & valid[None, :]
        if SLIDING:
            visible = visible & (positions[None, :] > query_positions[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))  # [M]; -inf for a row that saw no key yet
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(scores - safe_max[:, None])  # [M, N]
        alpha = tl.exp2(running_max - safe_max)
        values = tl.load(value_cache_ptr + offsets, mask=kv_mask, other=0.0)
        if DEQUANTIZE:
            values = values.to(tl.float32) * v_scale
        values = values.to(query.dtype)
        running_sum = running_sum * alpha + tl.sum(probs, axis=1)
        acc = acc * alpha[:, None] + tl.dot(probs.to(values.dtype), values, input_precision=DOT_PRECISION)
        running_max = new_max
    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    output_offsets = (query_start + rows)[:, None].to(tl.int64) * stride_ot + head * stride_oh + dims[None, :]
    tl.store(output_ptr + output_offsets, out.to(output_ptr.dtype.element_ty),
             mask=row_mask[:, None] & dim_mask[None, :])


def varlen_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, query_start_loc: torch.Tensor, context_lens: torch.Tensor,
                     output: torch.Tensor, max_query_len: int, scale: float, window: int | None,
                     k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Writes output [T, Hq, D] for queries [T, Hq, D] of ``len(context_lens)`` sequences."""
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = context_lens.shape[0]
    assert query.stride(2) == 1 and output.stride(2) == 1 and block_tables.stride(1) == 1
    assert key_cache.stride(3) == 1 and key_cache.stride() == value_cache.stride()
    block_m, block_n, num_warps = tiles_for(max_query_len)
    _varlen_attention_kernel[(num_tokens // block_m + num_seqs, num_heads)](
        query, key_cache, value_cache, block_tables, query_start_loc, context_lens, output,
        scale * LOG2E, float(k_scale), float(v_scale), window or 0, num_seqs,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0), output.stride(0), output.stride(1),
        GROUP=num_heads // key_cache.shape[2], BLOCK_SIZE=key_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), SLIDING=window is not None,
        DEQUANTIZE=key_cache.dtype == torch.float8_e4m3fn,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=num_warps,
    )
