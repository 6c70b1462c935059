"""Combine: each token's sum over its top-k weighted expert outputs, skipping pairs of other ranks' experts.

Shapes: y [T * k, H] from the down kernel, topk_ids [T, k] -> out [T, H] (out's dtype; summed in fp32).
Grid: (T, cdiv(H, BLOCK_H)).
"""
import triton
import triton.language as tl


@triton.jit
def moe_combine_kernel(y_ptr, topk_ids_ptr, out_ptr, hidden, expert_start, num_local_experts,
                       stride_yp, stride_ot, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        local = tl.load(topk_ids_ptr + token * TOP_K + j) - expert_start + tl.zeros([BLOCK_H], dtype=tl.int64)
        is_local = (local >= 0) & (local < num_local_experts)  # [BLOCK_H], all alike
        row = tl.load(y_ptr + (token * TOP_K + j) * stride_yp + cols, mask=col_ok & is_local, other=0.0)
        acc += row.to(tl.float32)
    tl.store(out_ptr + token * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)
