"""Grouped GEMM for the experts' down projection, with each pair's routing weight applied.

Shapes:
- h [P, I] from the gate-and-up kernel (compute dtype, or float8_e4m3fn with h_scale [P] fp32 per-row scales: W8A8);
- w2 [E_local, H, I], compute dtype or FP8 (float8_e4m3fn for W8A8, its raw bytes for weight-only, as in gate_up)
  with w2_scale [E_local, H] fp32 per-output-channel scales;
- topk_weights [P] fp32 (the flat [T, k] routing weights);
- sorted_pair_ids [S], block_expert [S / BLOCK_M], padded_total [1] from ``moe_align``;
- out [P, H] (compute dtype): row p = weight_p * down(h_p) for the pair's expert; rows of other ranks' pairs are left
  unwritten (the combine skips them).

Grid: one program per (BLOCK_M block of sorted pairs, BLOCK_N block of H) over the host bound, as in gate_up.
"""
import triton
import triton.language as tl

from model.kernels.moe.fp8_bits import E4M3_AS_FP16_FACTOR, e4m3_bits_to_scaled
from model.kernels.moe.gate_up import grouped_tile


@triton.jit
def moe_down_kernel(h_ptr, h_scale_ptr, w_ptr, w_scale_ptr, topk_weights_ptr, out_ptr,
                    sorted_pair_ids_ptr, block_expert_ptr, padded_total_ptr,
                    num_pairs, num_m_blocks, hidden, inter,
                    stride_hp, stride_we, stride_wn, stride_ws, stride_op,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    WEIGHT_FP8: tl.constexpr, ACT_FP8: tl.constexpr, IEEE_FP32: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m_blocks, hidden, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(padded_total_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    row_ok = pairs < num_pairs
    rows = pairs.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] of H
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_hp + ks[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = ks < inter - k0
        a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if WEIGHT_FP8 and not ACT_FP8:
            w = e4m3_bits_to_scaled(w, a.dtype)
        if IEEE_FP32:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if WEIGHT_FP8:
        w_scale = tl.load(w_scale_ptr + expert * stride_ws + cols, mask=col_ok, other=0.0)
        if not ACT_FP8:
            w_scale *= E4M3_AS_FP16_FACTOR
        acc *= w_scale[None, :]
    if ACT_FP8:
        acc *= tl.load(h_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    acc *= tl.load(topk_weights_ptr + rows, mask=row_ok, other=0.0)[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_op + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
