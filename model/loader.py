"""Loading a Dots1 checkpoint into the model, tensor by tensor, each rank reading only its shard.

The whole checkpoint is validated from its headers (missing, extra and mis-shaped tensors) before any data is read,
so a bad checkpoint fails in seconds with the file and key named; an error while reading propagates and no model is
returned.
"""
import ctypes
import logging
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from model.backend_selection import attention_backend_for, resolve_moe_backend
from model.checkpoint import TensorEntry, read_checkpoint_headers
from model.config import ModelConfig
from model.dots1 import Dots1ForCausalLM
from model.fp8 import FP8_DTYPE
from model.fp8_storage import deferred_projection_weights
from model.kv_scales import KV_SCALE_KEY
from model.linear import QuantizableProjection, can_pack_weights
from model.moe_backend import MoEBackend
from model.parallel import ParallelState
from model.gguf.loader import load_gguf_model
from model.gguf.reader import is_gguf_path
from model.quant.online import METHODS as CPU_METHODS
from model.quant.online import quantize_model_weights
from model.quantization import QUANTIZATION_METHODS, Fp8Scheme, online_fp8_scheme
from model.routed_experts import RoutedExperts
from model.self_check import BACKEND_CHOICES
from model.weights import FLOAT8, SCALE, CheckpointTensor, WeightTarget

LOAD_FORMATS = ("auto", "safetensors", "dummy")
# Buffers some exporters write that the model recomputes.
_IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq)$")
_DUMMY_SEED = 0
logger = logging.getLogger(__name__)
_DUMMY_STD = 0.02


def load_model(model_dir: str | Path, *, dtype: torch.dtype, device: torch.device | str, load_format: str = "auto",
               parallel: ParallelState | None = None, expert_metrics: bool = False,
               quantization: str | None = None, moe_backend: str = "auto", attention_backend: str = "auto",
               kv_cache_dtype: torch.dtype | None = None) -> Dots1ForCausalLM:
    """The model described by ``model_dir``/config.json, with its checkpoint's weights (or random ones: "dummy"),
    or by a dots1 GGUF file when ``model_dir`` ends in ``.gguf`` (see ``model.gguf.loader``).

    Weights are FP8 where the checkpoint's quantization_config says so, or (``quantization="fp8"``) quantized while
    they stream in from a high-precision checkpoint. ``moe_backend`` (auto, torch, triton) picks the routed experts'
    implementation, ``attention_backend`` (auto, torch, triton) the attention's, for a cache of ``kv_cache_dtype``
    (default: ``dtype``); both are chosen here, on ``device`` (see ``model.backend_selection``).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}: use one of {', '.join(LOAD_FORMATS)}")
    if attention_backend not in BACKEND_CHOICES:  # before a GGUF file loads, not after
        raise ValueError(f"unknown attention backend {attention_backend!r}: use one of {', '.join(BACKEND_CHOICES)}")
    model_dir = Path(model_dir)
    if is_gguf_path(model_dir):
        model = _load_gguf(model_dir, dtype=dtype, device=device, load_format=load_format, parallel=parallel,
                           expert_metrics=expert_metrics, quantization=quantization, moe_backend=moe_backend)
        model.attention_backend = attention_backend_for(model, attention_backend, device, dtype, kv_cache_dtype)
    else:
        model = _load_safetensors(model_dir, dtype=dtype, device=device, load_format=load_format, parallel=parallel,
                                  expert_metrics=expert_metrics, quantization=quantization, moe_backend=moe_backend,
                                  attention_backend=attention_backend, kv_cache_dtype=kv_cache_dtype)
    if can_pack_weights(torch.device(device)):
        model.pack_weights_for_cpu()
    release_free_heap()
    return model.eval()


def _load_safetensors(model_dir: Path, *, dtype: torch.dtype, device: torch.device | str, load_format: str,
                      parallel: ParallelState | None, expert_metrics: bool, quantization: str | None,
                      moe_backend: str, attention_backend: str,
                      kv_cache_dtype: torch.dtype | None) -> Dots1ForCausalLM:
    """The model of a config.json directory: its safetensors weights (FP8 where configured, int8/int4 packed after
    loading), or dummy ones. The attention backend is resolved before loading, so a refused one fails fast."""
    config = ModelConfig.from_pretrained(model_dir)
    cpu_method = quantization if quantization in CPU_METHODS else None
    if cpu_method is not None and torch.device(device).type != "cpu":
        raise ValueError(f"--quantization {cpu_method} packs weights for the CPU kernels; on {device} use fp8")
    scheme = weight_scheme(config, None if cpu_method else quantization)
    entries = None if load_format == "dummy" else read_checkpoint_headers(model_dir)
    backend = resolve_moe_backend(moe_backend, device, dtype, fp8=scheme is not None,
                                  has_moe_layers=bool(config.moe_layer_ids))
    model = build_model(config, scheme, dtype=dtype, device=device, parallel=parallel, expert_metrics=expert_metrics,
                        moe_backend=backend)
    model.attention_backend = attention_backend_for(model, attention_backend, device, dtype, kv_cache_dtype)
    if entries is None:
        initialize_dummy_weights(model)
    else:
        load_checkpoint(model, entries)
    if cpu_method is not None:
        quantize_model_weights(model, cpu_method)
    return model


def release_free_heap() -> None:
    """Hands the heap that loading freed (conversion chunks, replaced float weights) back to the OS: glibc keeps it
    otherwise, about 20% of a GGUF model's size in resident memory (measured)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _load_gguf(path: Path, *, dtype: torch.dtype, device: torch.device | str, load_format: str,
               parallel: ParallelState | None, expert_metrics: bool, quantization: str | None,
               moe_backend: str) -> Dots1ForCausalLM:
    if load_format == "safetensors":
        raise ValueError(f"{path}: --load-format safetensors given for a GGUF file (use auto)")
    if load_format == "dummy":
        raise ValueError(f"{path}: --load-format dummy needs a config.json directory, not a GGUF file")
    if quantization is not None:
        raise ValueError(f"{path}: --quantization {quantization} applies to safetensors checkpoints; a GGUF file "
                         "keeps the quantization it was written with")
    return load_gguf_model(path, dtype=dtype, device=device, parallel=parallel, expert_metrics=expert_metrics,
                           moe_backend=moe_backend)


def weight_scheme(config: ModelConfig, quantization: str | None) -> Fp8Scheme | None:
    """The checkpoint's FP8 scheme, else the one ``quantization`` asks for (None: weights in the compute dtype)."""
    if quantization is not None and quantization not in QUANTIZATION_METHODS + CPU_METHODS:
        raise ValueError(f"unknown quantization {quantization!r}: use one of {', '.join(QUANTIZATION_METHODS)}")
    if config.quantization is not None:
        if quantization is not None:
            logger.info("the checkpoint is already FP8 (quantization_config); --quantization %s adds nothing",
                        quantization)
        return config.quantization
    return online_fp8_scheme() if quantization == "fp8" else None


def build_model(config: ModelConfig, scheme: Fp8Scheme | None, *, dtype: torch.dtype, device: torch.device | str,
                parallel: ParallelState | None = None, expert_metrics: bool = False,
                moe_backend: MoEBackend | None = None) -> Dots1ForCausalLM:
    """The model with uninitialised weights, FP8 ones where ``scheme`` quantizes them."""
    options = dict(expert_metrics=expert_metrics, dtype=dtype, moe_backend=moe_backend)
    if scheme is None:
        with torch.device(device):
            return Dots1ForCausalLM(config, parallel, **options)
    with torch.device(device), deferred_projection_weights():
        model = Dots1ForCausalLM(config, parallel, **options)
    place_weights(model, scheme, device)
    return model


def place_weights(model: Dots1ForCausalLM, scheme: Fp8Scheme, device: torch.device | str) -> None:
    """Gives every deferred projection and expert weight its storage: float8 where ``scheme`` quantizes the
    checkpoint's Linear module(s) behind it, else the compute dtype. The router, norms, embeddings and lm_head are
    not such modules and stay in high precision."""
    for name, module in model.named_modules():
        checkpoint_name = f"model.{name}"  # decoder modules sit under "model." in checkpoints
        if isinstance(module, QuantizableProjection):
            parent = checkpoint_name.rpartition(".")[0]
            names = [f"{parent}.{matrix}" for matrix in module.names]
        elif isinstance(module, RoutedExperts):
            names = module.checkpoint_module_names(checkpoint_name)
        else:
            continue
        quantized = {scheme.quantizes(matrix) for matrix in names}
        if len(quantized) > 1:
            some = [matrix for matrix in names if scheme.quantizes(matrix)][:3]
            raise ValueError(f"quantization_config quantizes {some} but not all of {names[:3]}...: this engine runs "
                             "them as one matmul, so they must be quantized alike")
        if quantized.pop():
            module.use_fp8(scheme, device)
        else:
            module.allocate_weight(device)


def weight_summary(model: Dots1ForCausalLM) -> tuple[str, int]:
    """(the weights' types in words, e.g. "float8_e4m3fn+bfloat16" or "Q4_K+Q6_K+float32", and their bytes on this
    rank)."""
    breakdown = weight_breakdown(model)
    buffers = sum(tensor.numel() * tensor.element_size() for tensor in model.buffers())
    return "+".join(breakdown), sum(breakdown.values()) + buffers


def weight_breakdown(model: Dots1ForCausalLM) -> dict[str, int]:
    """Bytes of weights per type on this rank, quantized types first: torch dtypes for parameters, GGUF type names
    (or int8/int4) for the packed weights of the CPU kernels."""
    breakdown: dict[str, int] = {}
    for tensor in model.parameters():
        if tensor.numel():
            name = str(tensor.dtype).removeprefix("torch.")
            breakdown[name] = breakdown.get(name, 0) + tensor.numel() * tensor.element_size()
    for module in model.modules():
        if hasattr(module, "quantized_bytes_by_type"):
            for name, size in module.quantized_bytes_by_type().items():
                breakdown[name] = breakdown.get(name, 0) + size
    order = sorted(breakdown, key=lambda name: (name.startswith(("float", "bfloat")), not name.startswith("float8"),
                                                name))
    return {name: breakdown[name] for name in order}


def load_checkpoint(model: Dots1ForCausalLM, entries: dict[str, TensorEntry]) -> None:
    targets = model.weight_targets()
    plan = _plan(targets, entries)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key in plan:
        by_file[entries[key].file].append(key)
    with tqdm(total=len(plan), desc="Loading weights", unit="tensor", disable=None) as progress:
        for path, keys in by_file.items():
            with safe_open(path, framework="pt", device="cpu") as handle:
                for key in keys:
                    load = targets[key].load
                    if load is not None:
                        try:
                            load(CheckpointTensor.from_safetensors_slice(key, str(path), handle.get_slice(key)))
                        except Exception as e:
                            raise ValueError(f"{path}: failed to load tensor {key!r} ({e})") from e
                    progress.update()


def _plan(targets: dict[str, WeightTarget], entries: dict[str, TensorEntry]) -> list[str]:
    """The checkpoint keys to load, after checking the checkpoint holds exactly the tensors the model needs."""
    plan = []
    covered: dict[str, str] = {}
    for key, entry in entries.items():
        if _IGNORED_KEYS.search(key):
            continue
        target = targets.get(key)
        if target is None and KV_SCALE_KEY.search(key):
            raise ValueError(f"{entry.file}: unexpected tensor {key!r}: a KV-cache scale, but config.json's "
                             "quantization_config has no kv_cache_scheme (refusing to guess the cache it was "
                             "calibrated for)")
        if target is None and key.endswith("_scale"):
            raise ValueError(f"{entry.file}: unexpected tensor {key!r}: a float8 scale for a weight this model keeps "
                             "in high precision (no quantization_config, or its ignore list or targets exclude it)")
        if target is None:
            raise ValueError(f"{entry.file}: unexpected tensor {key!r}: the model (per config.json) has no such weight")
        if not target.accepts_shape(entry.shape):
            raise ValueError(f"{entry.file}: tensor {key!r} has shape {list(entry.shape)}, "
                             f"but config.json implies {list(target.shape)}")
        _check_dtype(key, entry, target)
        for canonical in target.covers:
            if canonical in covered:
                raise ValueError(f"{entry.file}: tensor {key!r} provides {canonical!r}, already given by "
                                 f"{covered[canonical]!r}")
            covered[canonical] = key
        plan.append(key)
    required = dict.fromkeys(key for target in targets.values() for key in target.covers)
    missing = [key for key in required if key not in covered]
    kv_scales = [key for key in missing if KV_SCALE_KEY.search(key)]
    if kv_scales:
        files = sorted({str(entry.file) for entry in entries.values()})
        spelled = kv_scales[0].rpartition("_")[0] + "_proj.output_scale"
        raise ValueError(f"{files}: quantization_config has a kv_cache_scheme, but the checkpoint has no "
                         f"{kv_scales[0]!r} (nor {spelled!r})"
                         + (f" ({len(kv_scales) - 1} more KV-cache scales missing)" if len(kv_scales) > 1 else ""))
    scales = [key for key in missing if key.endswith("_scale")]
    if scales:
        weight = scales[0].removesuffix("_scale")
        where = entries[weight].file if weight in entries else "the checkpoint"
        raise ValueError(f"{where}: float8 tensor {weight!r} has no scale {scales[0]!r}"
                         + (f" ({len(scales) - 1} more scales missing)" if len(scales) > 1 else ""))
    if missing:
        files = sorted({str(entry.file) for entry in entries.values()})
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"missing tensor {missing[0]!r}{more} in checkpoint {files}")
    return plan


def _check_dtype(key: str, entry: TensorEntry, target: WeightTarget) -> None:
    if entry.dtype in target.dtypes:
        return
    if target.dtypes == FLOAT8:
        raise ValueError(f"{entry.file}: tensor {key!r} is {entry.dtype}, but quantization_config quantizes it: "
                         "expected float8 e4m3 (F8_E4M3) with a scale")
    if target.dtypes == SCALE:
        raise ValueError(f"{entry.file}: tensor {key!r} has dtype {entry.dtype}, expected a scale in "
                         f"{'/'.join(sorted(SCALE))}")
    if entry.dtype.startswith("F8"):
        raise ValueError(f"{entry.file}: tensor {key!r} is float8 ({entry.dtype}), but this model keeps it in high "
                         "precision (no quantization_config, or its ignore list or targets exclude it)")
    raise ValueError(f"{entry.file}: tensor {key!r} has dtype {entry.dtype}, expected one of "
                     f"{sorted(target.dtypes)}")


def initialize_dummy_weights(model: Dots1ForCausalLM, seed: int = _DUMMY_SEED, std: float = _DUMMY_STD) -> None:
    """Deterministic random weights (norms at 1) for sizing and benchmarking without a checkpoint; FP8 weights get
    unit normal values with scales of ``std``."""
    with torch.no_grad():
        for index, (name, param) in enumerate(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            if name.endswith("_scale"):
                param.fill_(std)
                continue
            generator = torch.Generator(device=param.device).manual_seed(seed + index)
            if param.dtype == FP8_DTYPE:
                param.copy_(torch.randn(param.shape, generator=generator, device=param.device).to(FP8_DTYPE))
            else:
                param.normal_(0.0, std, generator=generator)
