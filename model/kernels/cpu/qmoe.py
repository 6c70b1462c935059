"""qmoe: the routed experts of one MoE layer over packed expert stacks, in one call (the C++ is in qmoe.cpp).

x [T, H] float32/bfloat16, expert_ids int64 [T, k], weights float32 [T, k], gate/up [E_local, I, H], down
[E_local, H, I] -> float32 [T, H] = sum_j weights[t, j] * down[e] @ (silu(gate[e] @ x[t]) * up[e] @ x[t]) with
e = expert_ids[t, j] - expert_start; ids outside [0, E_local) (other ranks' experts) add nothing.
"""
import torch

from model.kernels.cpu.extension import load
from model.kernels.cpu.qlinear import weight_args
from model.quant.packed import PackedQuantWeight


def qmoe(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate: PackedQuantWeight,
         up: PackedQuantWeight, down: PackedQuantWeight, expert_start: int = 0) -> torch.Tensor:
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    args = [weight_args(w) for w in (gate, up, down)]
    return load().qmoe(x.contiguous(), expert_ids.long(), weights.float(), [a[0] for a in args],
                       [a[1] for a in args], expert_start)
