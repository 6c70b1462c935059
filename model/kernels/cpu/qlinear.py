"""qlinear: x float32/bfloat16 [M, K] @ w^T for a packed w [N, K] -> float32 [M, N]; qlinear_shared_input: one x
quantized once for several weights (q/k/v, gate/up). The C++ is in qgemm.cpp; a bfloat16 x of 16 rows or more goes
through a bfloat16 copy of the weight and oneDNN (dequantize.cpp), its result rounded to bfloat16."""
import torch

from model.kernels.cpu.extension import load
from model.quant.packed import PackedQuantWeight


def weight_args(w: PackedQuantWeight) -> tuple[list[torch.Tensor | None], list[int]]:
    """(lo, hi, scale, min) and (bits, group_size, zero), as the extension takes a packed weight."""
    return [w.lo, w.hi, w.scale, w.min], [w.bits, w.group_size, w.zero]


def _activations(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


def qlinear(x: torch.Tensor, w: PackedQuantWeight) -> torch.Tensor:
    """x [..., K] -> float32 [..., N]."""
    if x.dim() == 2:
        return load().qlinear(_activations(x), [w.lo, w.hi, w.scale, w.min], [w.bits, w.group_size, w.zero])
    tensors, fmt = weight_args(w)
    return load().qlinear(_activations(x.reshape(-1, x.shape[-1])), tensors, fmt).view(*x.shape[:-1], -1)


def qlinear_shared_input(x: torch.Tensor, ws: list[PackedQuantWeight]) -> list[torch.Tensor]:
    """x [..., K] -> [float32 [..., N_i] for each w_i]."""
    args = [weight_args(w) for w in ws]
    ys = load().qlinear_shared_input(_activations(x.reshape(-1, x.shape[-1])), [a[0] for a in args],
                                     [a[1] for a in args])
    return [y.view(*x.shape[:-1], -1) for y in ys]
