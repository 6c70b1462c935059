"""Writing one step's keys and values into the paged KV cache by slot mapping.

    key, value              [T, Hkv, D]   any token/head strides, head_dim contiguous
    key_cache, value_cache  [num_blocks, block_size, Hkv, D], head_dim contiguous, same strides
    slot_mapping            [T] int64     block_id * block_size + offset; a negative slot (a padded row) is skipped
    grid                    (cdiv(T, BLOCK_T),)  BLOCK_T tokens of all their kv heads per program

An FP8 cache (float8_e4m3fn) stores ``clamp(x * (1 / scale), -448, 448)`` rounded to nearest, the same bytes
``model.kv_cache.quantize_kv`` writes for the torch backend.
"""
import torch
import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn
ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _round_to_e4m3(x):
    """float32 x in [-448, 448] rounded (to nearest, ties to even) onto the float8_e4m3fn grid, still float32.

    The conversion that follows is then exact everywhere; the Triton interpreter's own float8 rounding does not carry
    into the exponent (1.97 becomes 1.0), so the rounding is done here.
    """
    bits = x.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1  # lowest of the 3 mantissa bits kept
    normal = ((bits + 0x7FFFF + lsb) & -0x100000).to(tl.float32, bitcast=True)
    magnitude = tl.abs(x)
    subnormal = ((magnitude * 512.0 + 12582912.0) - 12582912.0) * 0.001953125  # multiples of 2^-9, below 2^-6
    subnormal = tl.where(bits < 0, -subnormal, subnormal)
    return tl.where(magnitude < 0.015625, subnormal, normal)


@triton.jit(do_not_specialize=["num_tokens"])  # a new batch size must not recompile
def _store_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    k_inv_scale, v_inv_scale, num_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_block, stride_cache_token, stride_cache_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_HD: tl.constexpr, QUANTIZE: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    slots = tl.load(slot_mapping_ptr + tokens, mask=tokens < num_tokens, other=-1).to(tl.int64)
    head_dims = tl.arange(0, BLOCK_HD)  # a kv head and a dimension, flattened
    heads = head_dims // HEAD_DIM
    dims = head_dims % HEAD_DIM
    mask = (slots >= 0)[:, None] & (head_dims < NUM_KV_HEADS * HEAD_DIM)[None, :]  # [BLOCK_T, BLOCK_HD]
    safe_slots = tl.maximum(slots, 0)
    cache_offsets = ((safe_slots // BLOCK_SIZE) * stride_cache_block + (safe_slots % BLOCK_SIZE) * stride_cache_token
                     )[:, None] + (heads * stride_cache_head + dims)[None, :]
    key = tl.load(key_ptr + tokens[:, None] * stride_kt + (heads * stride_kh + dims)[None, :], mask=mask)
    value = tl.load(value_ptr + tokens[:, None] * stride_vt + (heads * stride_vh + dims)[None, :], mask=mask)
    if QUANTIZE:
        key = _round_to_e4m3(tl.minimum(tl.maximum(key.to(tl.float32) * k_inv_scale, -FP8_MAX), FP8_MAX))
        value = _round_to_e4m3(tl.minimum(tl.maximum(value.to(tl.float32) * v_inv_scale, -FP8_MAX), FP8_MAX))
    tl.store(key_cache_ptr + cache_offsets, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + cache_offsets, value.to(value_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """key, value [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at slots [T] (negative: skipped)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(2) == 1 and value.stride(2) == 1 and key_cache.stride(3) == 1
    assert key_cache.stride() == value_cache.stride()
    block_hd = triton.next_power_of_2(num_kv_heads * head_dim)
    block_t = min(max(1, ELEMENTS_PER_PROGRAM // block_hd), triton.next_power_of_2(num_tokens))
    _store_kv_kernel[(triton.cdiv(num_tokens, block_t),)](
        key, value, key_cache, value_cache, slot_mapping,
        1.0 / k_scale, 1.0 / v_scale, num_tokens,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=key_cache.shape[1],
        BLOCK_T=block_t, BLOCK_HD=block_hd, QUANTIZE=key_cache.dtype == torch.float8_e4m3fn,
    )
