"""A projection's stacked matrices (q/k/v, gate/up) when each keeps its own storage: packed integer codes in the
format its checkpoint gave it, or a float matrix. One activation quantization serves every packed part."""
from dataclasses import replace

import torch
import torch.nn.functional as F

from model.kernels.cpu.qlinear import qlinear_shared_input
from model.quant.packed import PackedQuantWeight, nbytes

WeightPart = PackedQuantWeight | torch.Tensor


def matmul_parts(x: torch.Tensor, parts: list[WeightPart]) -> torch.Tensor:
    """x [T, K] -> float32 [T, sum of the parts' rows], the parts' outputs side by side."""
    packed = [part for part in parts if isinstance(part, PackedQuantWeight)]
    packed_outputs = iter(qlinear_shared_input(x, packed) if packed else [])
    outputs = [next(packed_outputs) if isinstance(part, PackedQuantWeight) else F.linear(x.float(), part.float())
               for part in parts]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def bytes_by_type(parts: list[WeightPart], types: list[str]) -> dict[str, int]:
    """Bytes of ``parts`` per type name (``types[i]`` names part i)."""
    totals: dict[str, int] = {}
    for part, name in zip(parts, types, strict=True):
        size = nbytes(part) if isinstance(part, PackedQuantWeight) else part.numel() * part.element_size()
        totals[name] = totals.get(name, 0) + size
    return totals


def stack_row_chunks(chunks: list[PackedQuantWeight], leading: tuple[int, ...]) -> PackedQuantWeight:
    """Packed row chunks of one matrix joined, the row dim then split into ``leading`` ([N] or [E, N])."""
    def join(name: str) -> torch.Tensor | None:
        parts = [getattr(chunk, name) for chunk in chunks]
        if parts[0] is None:
            return None
        joined = parts[0] if len(parts) == 1 else torch.cat(parts)
        return joined.reshape(*leading, joined.shape[-1])

    return replace(chunks[0], lo=join("lo"), hi=join("hi"), scale=join("scale"), min=join("min"))
