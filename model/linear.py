"""Projection layers that know their tensor-parallel shard and slice full checkpoint tensors for it.

A projection's weight is in the compute dtype, or float8 e4m3 with one float32 scale per output row
(``weight_scale``), read from an FP8 checkpoint or quantized while loading (``use_fp8``; the math is in model.fp8),
or, on the CPU, integer codes with group scales (``use_quantized``: GGUF files and --quantization int8/int4;
one part per stacked matrix, each in its own format, multiplied by the kernels in model.kernels.cpu).
"""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from model.fp8 import FP8_DTYPE, quantize_rows, supports_w8a8, w8a8_linear, weight_only_linear
from model.fp8_storage import new_weight, quantize_full_rows, read_scale, scale_shapes
from model.parallel import ParallelState
from model.quant.parts import WeightPart, bytes_by_type, matmul_parts
from model.quantization import Fp8Scheme
from model.weights import FLOAT8, SCALE, CheckpointTensor, WeightLoader, WeightTarget

_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
# oneDNN picks its blocked weight layout for this many rows; measured insensitive from 4 to 256 rows.
_PACKING_ROWS_HINT = 16
# oneDNN's blocked kernels run 1 or 2 rows up to 1.5x slower than 4 (float32 and bfloat16, measured), so fewer
# rows are padded up to it.
PACKED_MIN_ROWS = 4


def can_pack_weights(device: torch.device) -> bool:
    return _ONEDNN and device.type == "cpu"


def pack_weight(weight: torch.Tensor) -> nn.Parameter:
    """A oneDNN-blocked copy of a [out, in] CPU weight.

    ``linear`` runs blocked weights 1.3x to 1.6x faster than plain ones on the few-row matmuls of decoding (measured
    for bfloat16 and for float32, where PyTorch's default CPU BLAS is slower still).
    """
    return nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACKING_ROWS_HINT),
                        requires_grad=False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, in] @ weight^T + bias, for plain weights and weights from ``pack_weight``."""
    if not weight.is_mkldnn:
        return F.linear(x, weight, bias)
    rows = x.shape[0]
    if rows >= PACKED_MIN_ROWS:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    padded = F.pad(x, (0, 0, 0, PACKED_MIN_ROWS - rows))
    return torch.ops.mkldnn._linear_pointwise(padded, weight, bias, "none", [], "")[:rows]


class QuantizableProjection(nn.Module):
    """Owns ``weight`` [out, in] in the compute dtype, or in float8 with ``weight_scale`` [out] float32."""

    weight: nn.Parameter

    def init_weight(self, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        self.compute_dtype = dtype
        self.weight = new_weight((out_features, in_features), dtype)
        self.weight_scale: nn.Parameter | None = None
        self.fp8: Fp8Scheme | None = None
        self.w8a8 = False
        self.quant_parts: list[WeightPart] | None = None
        self.quant_types: list[str] = []

    def use_quantized(self, parts: list[WeightPart], types: list[str]) -> None:
        """Serves the stacked matrices from ``parts`` (packed integer weights, or float ones), one per matrix in
        output order; the float ``weight`` is dropped."""
        self.quant_parts = parts
        self.quant_types = types
        self.weight = new_weight((0, self.weight.shape[1]), self.compute_dtype, "cpu")

    @property
    def quantize_on_load(self) -> bool:
        return self.fp8 is not None and self.fp8.online

    def allocate_weight(self, device: torch.device | str) -> None:
        """Real storage in the compute dtype for a weight created deferred."""
        self.weight = new_weight(tuple(self.weight.shape), self.compute_dtype, device)

    def use_fp8(self, scheme: Fp8Scheme, device: torch.device | str) -> None:
        """Stores the weight as float8 with per-row scales; W8A8 where the scheme and the device allow it."""
        out_features, in_features = self.weight.shape
        self.weight = new_weight((out_features, in_features), FP8_DTYPE, device)
        self.weight_scale = new_weight((out_features,), torch.float32, device)
        self.fp8 = scheme
        self.w8a8 = scheme.dynamic_activations and supports_w8a8(torch.device(device), self.compute_dtype,
                                                                 out_features, in_features)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.quant_parts is not None:
            y = matmul_parts(x, self.quant_parts).to(x.dtype)
            return y if bias is None else y + bias
        if self.weight_scale is None:
            return linear(x, self.weight, bias)
        if self.w8a8:
            return w8a8_linear(x, self.weight, self.weight_scale[None, :], bias)
        return weight_only_linear(x, self.weight, self.weight_scale, bias)

    def quantized_bytes_by_type(self) -> dict[str, int]:
        return bytes_by_type(self.quant_parts or [], self.quant_types)

    def pack_weights(self) -> None:
        if self.quant_parts is not None:
            return
        if self.weight_scale is None:  # oneDNN has no float8 weights: FP8 projections dequantize per tile instead
            self.weight = pack_weight(self.weight)

    def _weight_targets(self, prefix: str, shape: tuple[int, int], load: WeightLoader,
                        load_scale: WeightLoader) -> dict[str, WeightTarget]:
        """``{prefix}.weight`` and, for a float8 checkpoint, ``{prefix}.weight_scale``."""
        key = f"{prefix}.weight"
        if self.fp8 is None or self.fp8.online:
            return {key: WeightTarget(shape, load, (key,))}
        scale_key = f"{prefix}.weight_scale"
        first, *others = scale_shapes(self.fp8.weight_strategy, shape[0])
        return {key: WeightTarget(shape, load, (key,), FLOAT8),
                scale_key: WeightTarget(first, load_scale, (scale_key,), SCALE, tuple(others))}


class ColumnParallelLinear(QuantizableProjection):
    """y = x W^T + b with W's output rows split across ranks.

    ``output_sizes`` lists checkpoint matrices stacked along the output (q/k/v, or gate/up) so one matmul computes
    them all; each is split across ranks on its own, so every rank holds its part of each. ``shards`` gives each
    matrix's (first row, rows) on this rank instead of an equal split (replicated kv heads).
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, parallel: ParallelState,
                 dtype: torch.dtype, names: list[str] | None = None,
                 shards: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = output_sizes
        self.parallel = parallel
        self.shards = shards or [parallel.shard(size, f"output size of {name}")
                                 for size, name in zip(output_sizes, names or ["a projection"] * len(output_sizes))]
        self.local_sizes = [size for _, size in self.shards]
        self.names = names or [f"matrix {index}" for index in range(len(output_sizes))]  # the checkpoint's names
        self.init_weight(sum(self.local_sizes), input_size, dtype)
        self.bias = (nn.Parameter(torch.empty(sum(self.local_sizes), dtype=dtype), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def weight_loader(self, param: nn.Parameter, source: CheckpointTensor, shard_id: int = 0) -> None:
        start, size = self.shards[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        part = source.read(slice(start, start + size))
        if param is self.weight and self.quantize_on_load:
            part, scale = quantize_rows(part.to(param.device))
            self.weight_scale.data[offset:offset + size].copy_(scale)
        param.data[offset:offset + size].copy_(part)

    def scale_loader(self, source: CheckpointTensor, shard_id: int) -> None:
        start, size = self.shards[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        rows = slice(start, start + size)
        self.weight_scale.data[offset:offset + size].copy_(read_scale(source, self.fp8.weight_strategy, rows))

    def weight_targets(self, prefixes: list[str]) -> dict[str, WeightTarget]:
        """Checkpoint keys ``{prefix}.weight`` (and ``.bias``) for each stacked matrix, in ``output_sizes`` order."""
        targets = {}
        for shard_id, (prefix, size) in enumerate(zip(prefixes, self.output_sizes, strict=True)):
            targets |= self._weight_targets(prefix, (size, self.input_size),
                                            partial(self.weight_loader, self.weight, shard_id=shard_id),
                                            partial(self.scale_loader, shard_id=shard_id))
            if self.bias is not None:
                key = f"{prefix}.bias"
                targets[key] = WeightTarget((size,), partial(self.weight_loader, self.bias, shard_id=shard_id), (key,))
        return targets


class RowParallelLinear(QuantizableProjection):
    """y = x W^T + b with W's input columns split across ranks; partial sums are all-reduced, then b is added."""

    def __init__(self, input_size: int, output_size: int, bias: bool, parallel: ParallelState, dtype: torch.dtype,
                 name: str = "a projection", reduce_output: bool = True) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.parallel = parallel
        self.reduce_output = reduce_output
        self.input_start, self.local_input_size = parallel.shard(input_size, f"input size of {name}")
        self.names = [name]
        self.init_weight(output_size, self.local_input_size, dtype)
        self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        if self.reduce_output:
            y = self.parallel.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def weight_loader(self, param: nn.Parameter, source: CheckpointTensor) -> None:
        if param is self.bias:
            param.data.copy_(source.read())
            return
        columns = slice(self.input_start, self.input_start + self.local_input_size)
        if self.quantize_on_load:  # a row's scale covers all its columns, on every rank
            weight, scale = quantize_full_rows(source, columns, device=param.device)
            self.weight_scale.data.copy_(scale)
            param.data.copy_(weight)
            return
        param.data.copy_(source.read(slice(None), columns))

    def scale_loader(self, source: CheckpointTensor) -> None:
        rows = slice(0, self.output_size)
        self.weight_scale.data.copy_(read_scale(source, self.fp8.weight_strategy, rows))

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        targets = self._weight_targets(prefix, (self.output_size, self.input_size),
                                       partial(self.weight_loader, self.weight), self.scale_loader)
        if self.bias is not None:
            key = f"{prefix}.bias"
            targets[key] = WeightTarget((self.output_size,), partial(self.weight_loader, self.bias), (key,))
        return targets
