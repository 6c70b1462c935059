"""Grouped GEMM for the experts' gate-and-up projection, fused with SiLU(gate) * up.

Shapes:
- x [T, H] activations (compute dtype, or float8_e4m3fn with x_scale [T] fp32 per-token scales: W8A8);
- w13 [E_local, 2I, H] (gate rows then up rows), compute dtype or FP8 with w13_scale [E_local, 2I] fp32
  per-output-channel scales, applied to the fp32 accumulator (exact: a channel's scale is constant along K). FP8
  weights are float8_e4m3fn for W8A8, and their raw bytes (uint8) for weight-only, widened in registers with
  ``e4m3_bits_to_scaled`` (any GPU);
- sorted_pair_ids [S], block_expert [S / BLOCK_M], padded_total [1] from ``moe_align``;
- out [P, I] (compute dtype): row p = t * k + j holds SiLU(gate) * up of token t for its j-th expert. Rows of pairs
  this rank does not hold are left unwritten.

Grid: one program per (BLOCK_M block of sorted pairs, BLOCK_N block of I), over the host bound S / BLOCK_M; a program
whose block lies past padded_total returns at once, and sentinel rows (pair id P) are masked.
"""
import triton
import triton.language as tl

from model.kernels.moe.fp8_bits import E4M3_AS_FP16_FACTOR, e4m3_bits_to_scaled


@triton.jit
def grouped_tile(pid, num_m_blocks, n_size, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(M block, N block) of a program, GROUP_M M blocks at a time so their weight tiles stay in L2 together."""
    num_n_blocks = tl.cdiv(n_size, BLOCK_N)
    in_group = GROUP_M * num_n_blocks
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_m_blocks - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_m, (pid % in_group) // group_m


@triton.jit
def moe_gate_up_kernel(x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, out_ptr,
                       sorted_pair_ids_ptr, block_expert_ptr, padded_total_ptr,
                       num_pairs, num_m_blocks, inter, hidden,
                       stride_xt, stride_we, stride_wn, stride_ws, stride_op,
                       TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, WEIGHT_FP8: tl.constexpr, ACT_FP8: tl.constexpr,
                       IEEE_FP32: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m_blocks, inter, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(padded_total_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    row_ok = pairs < num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] of I
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :]  # [BLOCK_M, BLOCK_K]
    gate_ptrs = w_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None]  # [BLOCK_K, BLOCK_N]
    up_ptrs = gate_ptrs + inter * stride_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = ks < hidden - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(gate_ptrs, mask=w_mask, other=0.0)
        w_up = tl.load(up_ptrs, mask=w_mask, other=0.0)
        if WEIGHT_FP8 and not ACT_FP8:  # weight-only: 8-bit tiles widened in registers
            w_gate = e4m3_bits_to_scaled(w_gate, a.dtype)
            w_up = e4m3_bits_to_scaled(w_up, a.dtype)
        if IEEE_FP32:
            gate = tl.dot(a, w_gate, gate, input_precision="ieee")
            up = tl.dot(a, w_up, up, input_precision="ieee")
        else:
            gate = tl.dot(a, w_gate, gate)
            up = tl.dot(a, w_up, up)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    if WEIGHT_FP8:
        scale_ptrs = w_scale_ptr + expert * stride_ws + cols
        gate_scale = tl.load(scale_ptrs, mask=col_ok, other=0.0)
        up_scale = tl.load(scale_ptrs + inter, mask=col_ok, other=0.0)
        if not ACT_FP8:
            gate_scale *= E4M3_AS_FP16_FACTOR
            up_scale *= E4M3_AS_FP16_FACTOR
        gate *= gate_scale[None, :]
        up *= up_scale[None, :]
    if ACT_FP8:
        token_scale = tl.load(x_scale_ptr + tokens, mask=row_ok, other=0.0)[:, None]
        gate *= token_scale
        up *= token_scale
    hidden_act = gate * tl.sigmoid(gate) * up
    out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_op + cols[None, :]
    tl.store(out_ptrs, hidden_act.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
