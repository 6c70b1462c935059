"""``--quantization int8|int4``: a high-precision checkpoint's matrices packed at load for the CPU kernels.

int8 is symmetric with one float16 scale per 32 weights (GGUF Q8_0's layout: 8.5 bits per weight); int4 is
asymmetric with a float16 scale and min per 32 weights (Q4_1's: 5 bits per weight). Codes are rounded against the
float16-rounded scale and min, so the only error is the rounding to the grid: at most half a step per weight.
The router, norms and embeddings stay in high precision; so does any matrix whose input size is not a multiple of 32.
"""
import torch
from torch import nn

from model.quant.packed import PackedQuantWeight, pack
from model.quant.parts import stack_row_chunks

GROUP = 32
METHODS = ("int8", "int4")
_ROWS_PER_CHUNK = 4096


def quantize_int8(weight: torch.Tensor) -> PackedQuantWeight:
    """[..., N, K] float -> 8-bit codes, zero point 128, a float16 scale per 32 weights."""
    def fields(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        scale = (groups.abs().amax(dim=-1) / 127).half()  # [rows, K/32]
        step = scale.float().clamp_min(torch.finfo(torch.float16).tiny)[..., None]
        codes = (groups / step).round().clamp(-127, 127) + 128
        return codes.to(torch.uint8), scale, None

    return _quantize(weight, fields, bits=8, zero=128)


def quantize_int4(weight: torch.Tensor) -> PackedQuantWeight:
    """[..., N, K] float -> 4-bit codes with a float16 scale and min per 32 weights: w ~ scale * code - min."""
    def fields(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).half()
        minimum = (-low).half()
        step = scale.float().clamp_min(torch.finfo(torch.float16).tiny)[..., None]
        codes = ((groups + minimum.float()[..., None]) / step).round().clamp(0, 15)
        return codes.to(torch.uint8), scale, minimum

    return _quantize(weight, fields, bits=4, zero=0)


def quantizable(weight: torch.Tensor) -> bool:
    return weight.shape[-1] % GROUP == 0 and weight.numel() > 0


def quantize_model_weights(model: nn.Module, method: str) -> None:
    """Packs every projection, routed-expert stack and the LM head of a loaded CPU model with ``method``."""
    from model.embedding import ParallelLMHead
    from model.linear import QuantizableProjection
    from model.routed_experts import RoutedExperts

    if method not in METHODS:
        raise ValueError(f"unknown CPU quantization {method!r}: use one of {', '.join(METHODS)}")
    quantize = quantize_int8 if method == "int8" else quantize_int4
    for module in model.modules():
        if isinstance(module, QuantizableProjection) and quantizable(module.weight):
            weights = module.weight.detach().split(module_sizes(module), dim=0)
            module.use_quantized([quantize(part.float()) for part in weights], [method] * len(weights))
        elif isinstance(module, RoutedExperts) and quantizable(module.w2) and quantizable(module.w13):
            gate, up = module.w13.detach().float().split(module.local_intermediate, dim=1)
            stacks = {"gate": quantize(gate), "up": quantize(up), "down": quantize(module.w2.detach().float())}
            module.use_quantized(stacks, [method] * 3)
        elif (isinstance(module, ParallelLMHead) and not module.tied and not module.parallel.is_parallel
              and quantizable(module.weight)):  # a vocabulary split across ranks stays float (its all-gather)
            module.use_quantized(quantize(module.weight.detach().float()), method)


def module_sizes(module: nn.Module) -> list[int]:
    """Rows of each stacked matrix of a projection (q/k/v, gate/up), or all rows as one."""
    return list(getattr(module, "local_sizes", [module.weight.shape[0]]))


def _quantize(weight: torch.Tensor, fields, *, bits: int, zero: int) -> PackedQuantWeight:
    *leading, rows, columns = weight.shape
    if columns % GROUP:
        raise ValueError(f"input size {columns} is not a multiple of {GROUP}")
    flat = weight.reshape(-1, columns)
    chunks = []
    for start in range(0, flat.shape[0], _ROWS_PER_CHUNK):
        groups = flat[start:start + _ROWS_PER_CHUNK].float().reshape(-1, columns // GROUP, GROUP)
        codes, scale, minimum = fields(groups)
        chunks.append(pack(codes.reshape(-1, columns), scale, minimum, bits=bits, group_size=GROUP, zero=zero))
    return stack_row_chunks(chunks, (*leading, rows))
