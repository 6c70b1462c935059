"""float8 e4m3 weights: quantizing per output channel, and the two matmuls over them.

- W8A8 (CUDA, compute capability 8.9+, bfloat16 compute): activations quantized per token on the fly, one
  ``torch._scaled_mm`` with row-wise scales (token scales x channel scales).
- Weight-only (everywhere else): the weight dequantized tile by tile into the compute dtype right before its
  matmul, so no high-precision copy of a weight stays resident. In float32 every tile holds exactly the
  values ``weight.float() * scale`` gives, so the result is what the dequantized weights give.
"""
import logging

import torch
import torch.nn.functional as F

from model.self_check import SelfCheckResult

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
_MIN_SCALE = 1e-12  # an all-zero row still gets a usable scale
# Weight elements dequantized at once on the weight-only path (32 MiB of bfloat16).
TILE_ELEMENTS = 1 << 24
_w8a8_checks: dict[torch.device, SelfCheckResult] = {}  # one check per device and process


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., out, in] -> (float8 [..., out, in], float32 scales [..., out]), scale = amax(|row|) / 448."""
    wide = weight.float()
    scale = (wide.abs().amax(dim=-1) / FP8_MAX).clamp(min=_MIN_SCALE)  # [..., out]
    quantized = (wide / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8 [..., out, in] with float32 scales [..., out] -> [..., out, in] in ``dtype``."""
    return (weight.float() * scale[..., None]).to(dtype)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (float8 [T, K], float32 scales [T, 1])."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=_MIN_SCALE)  # [T, 1]
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ dequantize(weight [N, K], scale [N])^T + bias, dequantizing a tile of output rows at a time."""
    rows_per_tile = max(1, TILE_ELEMENTS // weight.shape[1])
    if weight.shape[0] <= rows_per_tile:
        return _tile_linear(x, weight, scale, bias)
    parts = []
    for start in range(0, weight.shape[0], rows_per_tile):
        rows = slice(start, start + rows_per_tile)
        parts.append(_tile_linear(x, weight[rows], scale[rows], None if bias is None else bias[rows]))
    return torch.cat(parts, dim=-1)


def _tile_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """float32: the exact dequantized weights. Narrower dtypes: e4m3 widens exactly into bf16/fp16 and the
    per-row scale moves onto the (much smaller) output, in float32 (fp16 has no room for tiny scales), which saves
    two passes over the weight tile."""
    if x.dtype == torch.float32:
        return F.linear(x, dequantize(weight, scale, x.dtype), bias)
    out = (F.linear(x, weight.to(x.dtype)).float() * scale).to(x.dtype)
    return out if bias is None else out + bias


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, scale_row: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] bfloat16, weight [N, K] float8, scale_row [1, N] float32 -> [T, N] bfloat16."""
    x_q, x_scale = quantize_per_token(x)
    out = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=scale_row, out_dtype=x.dtype)
    return out if bias is None else out + bias


def supports_w8a8(device: torch.device, dtype: torch.dtype, *shape: int) -> bool:
    """Whether W8A8 runs here: CUDA with compute capability 8.9+, bfloat16 compute, dims that are multiples of 16,
    and a self-check of ``torch._scaled_mm`` against the weight-only path that passed on this device."""
    if device.type != "cuda" or dtype != torch.bfloat16 or any(size % 16 for size in shape):
        return False
    if torch.cuda.get_device_capability(device) < (8, 9):
        return False
    return logged_w8a8_check(device).passed


def logged_w8a8_check(device: torch.device) -> SelfCheckResult:
    """``check_w8a8`` on ``device``, run and logged once per device and process."""
    if device not in _w8a8_checks:
        result = check_w8a8(device)
        if result.passed:
            logger.info("FP8 W8A8 with torch._scaled_mm (row-wise scales) on %s (%s)", device, result.describe())
        else:
            logger.warning("FP8 W8A8 failed its self-check on %s (%s); running FP8 weights weight-only", device,
                           result.describe())
        _w8a8_checks[device] = result
    return _w8a8_checks[device]


def check_w8a8(device: torch.device) -> SelfCheckResult:
    """``w8a8_linear`` against the weight-only path on ``device``: relative error at most 0.1."""
    check = "check_w8a8"
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(5, 64, device=device, generator=generator).to(torch.bfloat16)
        weight, scale = quantize_rows(torch.randn(32, 64, device=device, generator=generator))
        expected = weight_only_linear(x.float(), weight, scale)
        actual = w8a8_linear(x, weight, scale[None, :]).float()
        error = ((actual - expected).norm() / expected.norm()).item()
        difference = (actual - expected).abs().max().item()
    except Exception as error:  # any failure of the fast path sends FP8 weights to the reference path
        return SelfCheckResult.failed_by(check, error)
    return SelfCheckResult(check, error <= 0.1, f"relative error {error:.3f} against the weight-only path",
                           difference)
