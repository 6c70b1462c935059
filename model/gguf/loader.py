"""Building Dots1ForCausalLM from a dots1 GGUF file.

On the CPU every quantized matrix stays in the bits the file gives it: its blocks become packed integer codes with
float16 group scales (``model.gguf.blocks``, ``model.quant.packed``), converted a few thousand rows at a time from
the memory-mapped file, so no high-precision copy of a quantized tensor is ever made. F32/F16/BF16 matrices, norms,
the router and its bias are float. On other devices (no quantized kernels there yet) every tensor is dequantized
into the model dtype at load and the model runs exactly as from a safetensors checkpoint.
"""
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from tqdm import tqdm

from model.backend_selection import resolve_moe_backend
from model.dots1 import Dots1ForCausalLM
from model.fp8_storage import deferred_projection_weights
from model.gguf.blocks import FLOAT_TYPES, dequantize, split_blocks
from model.gguf.config import config_from_gguf
from model.gguf.reader import GGUFCheckpoint, GGUFTensor, read_metadata
from model.gguf.tensor_map import Destination, tensor_destinations
from model.linear import QuantizableProjection
from model.moe_backend import TorchMoEBackend
from model.parallel import ParallelState
from model.quant.packed import PackedQuantWeight, pack
from model.quant.parts import stack_row_chunks
from model.routed_experts import RoutedExperts

logger = logging.getLogger(__name__)
# Rows converted at once: bounds the temporary int tensors of a conversion to a few tens of MB.
_ROWS_PER_CHUNK = 2048


def load_gguf_model(path: str | Path, *, dtype: torch.dtype, device: torch.device | str,
                    parallel: ParallelState | None = None, expert_metrics: bool = False,
                    moe_backend: str = "auto", keep_quantized: bool | None = None) -> Dots1ForCausalLM:
    """The model of a dots1 GGUF file (or the first file of a split set), weights loaded. ``keep_quantized``
    (default: on the CPU, when the CPU kernels build) keeps quantized tensors packed; False dequantizes them into
    ``dtype``."""
    device = torch.device(device)
    parallel = parallel or ParallelState()
    if parallel.world_size > 1:
        raise ValueError(f"{path}: GGUF checkpoints run on one rank; tensor parallelism needs a safetensors "
                         "checkpoint")
    config = config_from_gguf(read_metadata(path))
    checkpoint = GGUFCheckpoint(path)
    if keep_quantized is None:
        keep_quantized = device.type == "cpu" and cpu_kernels_available()
    if keep_quantized:
        backend = TorchMoEBackend()  # runs packed experts with the fused CPU kernel (``RoutedExperts.use_quantized``)
    else:
        backend = resolve_moe_backend(moe_backend, device, dtype, fp8=False, has_moe_layers=config.has_moe_layers)
    with torch.device(device), deferred_projection_weights():
        model = Dots1ForCausalLM(config, parallel, expert_metrics=expert_metrics, dtype=dtype, moe_backend=backend)
    destinations = tensor_destinations(model)
    _check_tensors(checkpoint, destinations)
    grouped = _group_by_module(destinations)
    with tqdm(total=len(destinations), desc="Loading GGUF weights", unit="tensor", disable=None) as progress:
        for module, names in grouped:
            tensors = [checkpoint.tensors[name] for name in names]
            try:
                _load_module(module, [destinations[name] for name in names], tensors, dtype, device, keep_quantized)
            except Exception as e:
                raise ValueError(f"{tensors[0].file}: failed to load tensor(s) {names} ({e})") from e
            progress.update(len(names))
    if model.lm_head.tied:
        model.lm_head.weight = model.embed_tokens.weight
    counts = ", ".join(f"{count} {name}" for name, count in sorted(checkpoint.type_counts().items()))
    logger.info("GGUF %s: %d tensors (%s); %s", checkpoint.path.name, len(checkpoint.tensors), counts,
                "kept in their GGUF bits on the CPU" if keep_quantized else f"dequantized to {dtype} on {device}")
    return model.eval()


def cpu_kernels_available() -> bool:
    """Whether the CPU quantized kernels build and load here; without them a GGUF file still serves, dequantized."""
    from model.kernels.cpu.extension import load

    try:
        load()
    except (RuntimeError, OSError, ImportError) as error:
        logger.warning("the CPU quantized kernels are unavailable (%s): GGUF weights are dequantized at load instead "
                       "(more memory, slower decoding)", error)
        return False
    return True


def _check_tensors(checkpoint: GGUFCheckpoint, destinations: dict[str, Destination]) -> None:
    for name, tensor in checkpoint.tensors.items():
        if name not in destinations:
            raise ValueError(f"{tensor.file}: unexpected tensor {name!r}: the dots1 model the metadata describes has "
                             "no such weight")
        expected = destinations[name].shape
        if tensor.shape != expected:
            raise ValueError(f"{tensor.file}: tensor {name!r} has shape {list(tensor.shape)}, but the metadata "
                             f"implies {list(expected)}")
    missing = [name for name in destinations if name not in checkpoint.tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"{checkpoint.path}: missing tensor {missing[0]!r}{more}")


def _group_by_module(destinations: dict[str, Destination]) -> list[tuple[torch.nn.Module, list[str]]]:
    """Tensor names per destination module, so stacked parts (q/k/v, gate/up, expert stacks) load together."""
    groups: dict[int, tuple[torch.nn.Module, list[str]]] = {}
    for name, destination in destinations.items():
        groups.setdefault(id(destination.module), (destination.module, []))[1].append(name)
    return list(groups.values())


def _load_module(module: torch.nn.Module, destinations: list[Destination], tensors: list[GGUFTensor],
                 dtype: torch.dtype, device: torch.device, keep_quantized: bool) -> None:
    kind = destinations[0].kind
    if isinstance(module, QuantizableProjection):
        _load_projection(module, destinations, tensors, device, keep_quantized)
    elif isinstance(module, RoutedExperts):
        _load_experts(module, destinations, tensors, dtype, device, keep_quantized)
    elif kind == "embedding":
        (tensor,) = tensors
        if keep_quantized and tensor.qtype not in FLOAT_TYPES:
            module.use_quantized(convert_packed(tensor), tensor.type_name)
        else:
            module.weight = torch.nn.Parameter(read_float(tensor).to(device, dtype), requires_grad=False)
    else:
        for destination, tensor in zip(destinations, tensors):
            parameter = getattr(module, destination.parameter)
            parameter.data.copy_(read_float(tensor).reshape(parameter.shape))


def _load_projection(module: QuantizableProjection, destinations: list[Destination], tensors: list[GGUFTensor],
                     device: torch.device, keep_quantized: bool) -> None:
    weights = sorted((d.part, t) for d, t in zip(destinations, tensors) if d.kind == "projection")
    for destination, tensor in zip(destinations, tensors):
        if destination.kind == "bias":
            sizes = getattr(module, "local_sizes", [module.bias.shape[0]])
            offset = sum(sizes[:destination.part])
            module.bias.data[offset:offset + sizes[destination.part]].copy_(read_float(tensor))
    if keep_quantized and any(tensor.qtype not in FLOAT_TYPES for _, tensor in weights):
        parts = [read_float(tensor) if tensor.qtype in FLOAT_TYPES else convert_packed(tensor)
                 for _, tensor in weights]
        module.use_quantized(parts, [tensor.type_name for _, tensor in weights])
        return
    module.allocate_weight(device)
    offset = 0
    for _, tensor in weights:
        rows = tensor.shape[0]
        module.weight.data[offset:offset + rows].copy_(read_float(tensor))
        offset += rows


def _load_experts(experts: RoutedExperts, destinations: list[Destination], tensors: list[GGUFTensor],
                  dtype: torch.dtype, device: torch.device, keep_quantized: bool) -> None:
    by_part = {destination.part: tensor for destination, tensor in zip(destinations, tensors)}
    if keep_quantized and any(tensor.qtype not in FLOAT_TYPES for tensor in by_part.values()):
        stacks = {part: convert_packed(tensor) if tensor.qtype not in FLOAT_TYPES else quantize_float_experts(tensor)
                  for part, tensor in by_part.items()}
        experts.use_quantized(stacks, [by_part[part].type_name for part in ("gate", "up", "down")])
        return
    experts.allocate_weight(device)
    inter = experts.local_intermediate
    for part, tensor in by_part.items():
        for expert in range(experts.num_experts):
            weight = read_float(tensor, expert)
            if part == "down":
                experts.w2.data[expert].copy_(weight)
            else:
                half = 0 if part == "gate" else 1
                experts.w13.data[expert, half * inter:(half + 1) * inter].copy_(weight)


def quantize_float_experts(tensor: GGUFTensor) -> PackedQuantWeight:
    """A float expert stack beside quantized ones (a hand-made mix): stored as 8-bit g32 codes, since the fused
    expert kernel runs packed stacks only."""
    from model.quant.online import quantize_int8

    return quantize_int8(read_float(tensor))


def read_float(tensor: GGUFTensor, *index: int) -> torch.Tensor:
    """float32 values of ``tensor`` (or of ``tensor[index]``), dequantized if the file quantized it."""
    data = tensor.data[index] if index else tensor.data
    shape = tensor.shape[len(index):]
    if tensor.qtype in FLOAT_TYPES:  # a copy: a view would keep the whole file mapped (and resident)
        return _as_torch(data).view(FLOAT_TYPES[tensor.qtype]).to(torch.float32, copy=True).reshape(shape)
    raw = _as_torch(data).reshape(-1, data.shape[-1])
    rows = [dequantize(raw[start:start + _ROWS_PER_CHUNK], tensor.qtype)
            for start in range(0, raw.shape[0], _ROWS_PER_CHUNK)]
    return torch.cat(rows).reshape(shape)


def convert_packed(tensor: GGUFTensor) -> PackedQuantWeight:
    """The packed form of a quantized tensor ([N, K], or [E, N, K] for expert stacks), converted in row chunks."""
    qtype = GGMLQuantizationType(tensor.qtype)
    raw = tensor.data.reshape(-1, tensor.data.shape[-1])  # [rows, row_bytes] over all experts
    chunks = []
    for start in range(0, raw.shape[0], _ROWS_PER_CHUNK):
        fields = split_blocks(_as_torch(raw[start:start + _ROWS_PER_CHUNK]), qtype)
        scale, minimum = fields.scale.half(), None if fields.min is None else fields.min.half()
        if not (scale.isfinite().all() and (minimum is None or minimum.isfinite().all())):
            raise ValueError(f"tensor {tensor.name!r} has group scales beyond float16's range (or not finite)")
        chunks.append(pack(fields.codes, scale, minimum, bits=fields.bits, group_size=fields.group_size,
                           zero=fields.zero))
    return stack_row_chunks(chunks, tensor.shape[:-1])


def _as_torch(data: np.ndarray) -> torch.Tensor:
    """A torch view of a read-only memory-mapped array (never written through)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the array is not writable
        return torch.from_numpy(np.asarray(data))
