"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), used for dense layers and the shared experts."""
import torch
import torch.nn.functional as F
from torch import nn

from model.linear import ColumnParallelLinear, RowParallelLinear
from model.parallel import ParallelState
from model.weights import WeightTarget


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, parallel: ParallelState, dtype: torch.dtype,
                 reduce_output: bool = True) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden_size, [intermediate_size, intermediate_size], False, parallel,
                                                 dtype, names=["gate_proj", "up_proj"])
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, parallel, dtype, name="down_proj",
                                           reduce_output=reduce_output)
        self.local_intermediate = self.gate_up_proj.local_sizes[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 * I]
        gate, up = gate_up.split(self.local_intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        targets = self.gate_up_proj.weight_targets([f"{prefix}.gate_proj", f"{prefix}.up_proj"])
        return targets | self.down_proj.weight_targets(f"{prefix}.down_proj")
