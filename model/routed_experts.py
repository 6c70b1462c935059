"""A layer's routed experts as weights: the stacks the MoE backends compute with, in whichever storage they hold.

Filling them from a checkpoint is ``model.expert_loading`` (safetensors layouts) or ``model.gguf.loader``; running
them is a ``model.moe_backend.MoEBackend``.
"""
import torch
from torch import nn

from model.config import ModelConfig
from model.fp8 import FP8_DTYPE, dequantize
from model.fp8_storage import new_weight
from model.linear import PACKED_MIN_ROWS, pack_weight
from model.parallel import ParallelState
from model.quant.packed import PackedQuantWeight
from model.quant.parts import bytes_by_type
from model.quantization import Fp8Scheme


class RoutedExperts(nn.Module):
    """Tensor parallel splits each expert's intermediate size; expert parallel gives each rank whole experts (pairs
    routed to other ranks' experts add nothing here).

    Storage, one of:
    - stacked gate-and-up ``w13`` [E_local, 2I, H] (gate rows before up rows) and down ``w2`` [E_local, H, I] in the
      compute dtype: what the grouped-GEMM kernels read;
    - the same stacks in float8 with float32 per-output-row scales ``w13_scale`` [E_local, 2I] and ``w2_scale``
      [E_local, H] (``use_fp8``);
    - on the CPU, lists of per-expert oneDNN-packed weights (``pack_for_cpu``; same indexing: w13[e] is expert e's
      [2I, H]);
    - on the CPU, packed integer stacks "gate"/"up" [E_local, I, H] and "down" [E_local, H, I], each in its own
      format (``use_quantized``: GGUF files, --quantization int8/int4).
    """

    def __init__(self, config: ModelConfig, parallel: ParallelState, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.moe_intermediate_size
        if parallel.expert_parallel:
            self.expert_start, self.num_local_experts = parallel.shard(self.num_experts, "n_routed_experts")
            self.inter_start, self.local_intermediate = 0, self.intermediate_size
        else:
            self.expert_start, self.num_local_experts = 0, self.num_experts
            self.inter_start, self.local_intermediate = parallel.shard(self.intermediate_size, "moe_intermediate_size")
        inter, hidden = self.local_intermediate, self.hidden_size
        self.compute_dtype = dtype
        self.w13: nn.Parameter | nn.ParameterList = new_weight((self.num_local_experts, 2 * inter, hidden), dtype)
        self.w2: nn.Parameter | nn.ParameterList = new_weight((self.num_local_experts, hidden, inter), dtype)
        self.w13_scale: nn.Parameter | None = None
        self.w2_scale: nn.Parameter | None = None
        self.fp8: Fp8Scheme | None = None
        self.min_rows = 1  # rows per expert group; raised when packed weights run fewer rows slowly
        self.quantized: dict[str, PackedQuantWeight] | None = None
        self.quant_types: list[str] = []

    @property
    def local_experts(self) -> slice:
        """This rank's experts among the global expert ids."""
        return slice(self.expert_start, self.expert_start + self.num_local_experts)

    def use_quantized(self, stacks: dict[str, PackedQuantWeight], types: list[str]) -> None:
        """Serves the experts from packed integer stacks (single rank); the float stacks are dropped."""
        self.quantized, self.quant_types = stacks, types
        self.w13 = new_weight((0, 2 * self.local_intermediate, self.hidden_size), self.compute_dtype, "cpu")
        self.w2 = new_weight((0, self.hidden_size, self.local_intermediate), self.compute_dtype, "cpu")

    def quantized_bytes_by_type(self) -> dict[str, int]:
        if self.quantized is None:
            return {}
        return bytes_by_type([self.quantized[part] for part in ("gate", "up", "down")], self.quant_types)

    def expert_weights(self, local_expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``local_expert``'s (gate-and-up [2I, H], down [H, I]) for ``linear``: FP8 ones dequantized, one
        expert at a time."""
        if self.w13_scale is None:
            return self.w13[local_expert], self.w2[local_expert]
        return (dequantize(self.w13[local_expert], self.w13_scale[local_expert], self.compute_dtype),
                dequantize(self.w2[local_expert], self.w2_scale[local_expert], self.compute_dtype))

    def allocate_weight(self, device: torch.device | str) -> None:
        """Real storage in the compute dtype for weights created deferred."""
        self.w13 = new_weight(tuple(self.w13.shape), self.compute_dtype, device)
        self.w2 = new_weight(tuple(self.w2.shape), self.compute_dtype, device)

    def use_fp8(self, scheme: Fp8Scheme, device: torch.device | str) -> None:
        experts, two_inter, hidden = self.w13.shape
        self.w13 = new_weight((experts, two_inter, hidden), FP8_DTYPE, device)
        self.w2 = new_weight((experts, hidden, two_inter // 2), FP8_DTYPE, device)
        self.w13_scale = new_weight((experts, two_inter), torch.float32, device)
        self.w2_scale = new_weight((experts, hidden), torch.float32, device)
        self.fp8 = scheme

    def checkpoint_module_names(self, prefix: str) -> list[str]:
        """The checkpoint's Linear module names of these experts (what a quantization_config's ignore names)."""
        return [f"{prefix}.{expert}.{name}" for expert in range(self.num_experts)
                for name in ("gate_proj", "up_proj", "down_proj")]

    def pack_for_cpu(self) -> None:
        """Re-lays out each expert's float weights for oneDNN (the torch backend's per-expert matmuls)."""
        if self.quantized is not None or self.fp8 is not None:  # oneDNN has no float8 or integer-stack weights
            return
        self.min_rows = PACKED_MIN_ROWS
        w13 = nn.ParameterList([pack_weight(weight) for weight in self.w13])
        w2 = nn.ParameterList([pack_weight(weight) for weight in self.w2])
        del self.w13, self.w2  # frees the stacked tensors
        self.w13, self.w2 = w13, w2
