"""Where FP8 weights come from: deferred allocation, the checkpoint's scale layouts, online quantization.

A model whose weights may be FP8 is built under ``deferred_projection_weights``: its projections' (and routed
experts') weights start on the meta device, and ``use_fp8`` / ``allocate_weight`` then give each its real storage,
so no high-precision copy of a quantized weight is ever allocated.
"""
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from model.fp8 import TILE_ELEMENTS, quantize_rows
from model.weights import CheckpointTensor

_defer_weights: ContextVar[bool] = ContextVar("defer_projection_weights", default=False)


@contextmanager
def deferred_projection_weights() -> Iterator[None]:
    token = _defer_weights.set(True)
    try:
        yield
    finally:
        _defer_weights.reset(token)


def new_weight(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None) -> nn.Parameter:
    """An uninitialised weight; on the meta device while weights are deferred and no device is given."""
    if device is None and _defer_weights.get():
        device = "meta"
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def scale_shapes(strategy: str, rows: int, *leading: int) -> tuple[tuple[int, ...], ...]:
    """Shapes a checkpoint may give the scales of ``rows`` output rows (after ``leading`` dims such as experts):
    per channel [..., rows, 1] (or [rows]); per tensor [..., 1, 1] (or [1], or a scalar)."""
    if strategy == "channel":
        return ((*leading, rows, 1),) if leading else ((rows, 1), (rows,))
    return ((*leading, 1, 1),) if leading else ((1,), ())


def read_scale(source: CheckpointTensor, strategy: str, rows: slice, *leading: slice) -> torch.Tensor:
    """float32 scales [..., rows] of output rows ``rows`` from a per-channel or per-tensor scale tensor."""
    scale = source.read(*leading).float()
    scale = scale.reshape(*scale.shape[:len(leading)], -1)  # [..., out] or [..., 1]
    if strategy == "tensor":
        return scale.expand(*scale.shape[:-1], rows.stop - rows.start)
    return scale[..., rows]


def quantize_full_rows(source: CheckpointTensor, columns: slice, *leading: slice,
                       device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Online quantization of a high-precision [..., out, in] tensor whose columns are split across ranks: each
    row's scale comes from the whole row, read a few rows at a time (and quantized on ``device``); returns
    (float8 [..., out, columns], scales [..., out])."""
    *_, num_rows, num_columns = source.shape
    rows_per_read = max(1, TILE_ELEMENTS // num_columns)
    weights, scales = [], []
    for start in range(0, num_rows, rows_per_read):
        quantized, scale = quantize_rows(source.read(*leading, slice(start, start + rows_per_read)).to(device))
        weights.append(quantized[..., columns])
        scales.append(scale)
    return torch.cat(weights, dim=-2), torch.cat(scales, dim=-1)
