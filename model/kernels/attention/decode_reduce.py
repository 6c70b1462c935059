"""Combining the splits of ``decode_split_kv`` into each decode token's attention output.

    partial_out   [B, Hq, S, D] fp32, each split's normalised output
    partial_lse   [B, Hq, S] fp32, each split's log2-sum-exp (-inf: the split saw no key)
    output        [B, Hq, D]    the query dtype; zeros for a row no split saw a key of (a padded row)
    grid          (B, Hq)
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _decode_reduce_kernel(
    partial_out_ptr, partial_lse_ptr, output_ptr, num_splits,
    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    lse = tl.load(partial_lse_ptr + seq * stride_lt + head * stride_lh + splits, mask=split_mask,
                  other=float("-inf"))  # [BLOCK_S]
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.exp2(lse - top)  # [BLOCK_S], 0 for empty splits
    total = tl.sum(weights, axis=0)
    parts = tl.load(partial_out_ptr + seq * stride_pt + head * stride_ph + splits[:, None] * stride_ps + dims[None, :],
                    mask=split_mask[:, None] & dim_mask[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    out = tl.sum(weights[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(output_ptr + seq * stride_ot + head * stride_oh + dims, out.to(output_ptr.dtype.element_ty), mask=dim_mask)


def decode_reduce(partial_out: torch.Tensor, partial_lse: torch.Tensor, output: torch.Tensor) -> None:
    num_seqs, num_heads, num_splits, head_dim = partial_out.shape
    assert output.stride(2) == 1 and partial_out.stride(3) == 1 and partial_lse.stride(2) == 1
    _decode_reduce_kernel[(num_seqs, num_heads)](
        partial_out, partial_lse, output, num_splits,
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2), partial_lse.stride(0),
        partial_lse.stride(1), output.stride(0), output.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_S=triton.next_power_of_2(num_splits),
    )
