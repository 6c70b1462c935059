"""Loading a Dots1 checkpoint into the model, tensor by tensor, each rank reading only its shard.

The whole checkpoint is validated from its headers (missing, extra and mis-shaped tensors) before any data is read,
so a bad checkpoint fails in seconds with the file and key named; an error while reading propagates and no model is
returned.
"""
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from model.attention_backend import ATTENTION_BACKENDS, resolve_attention_backend
from model.checkpoint import TensorEntry, read_checkpoint_headers
from model.config import ModelConfig
from model.dots1 import Dots1ForCausalLM
from model.linear import can_pack_weights
from model.parallel import ParallelState
from model.weights import CheckpointTensor, WeightTarget

LOAD_FORMATS = ("auto", "safetensors", "dummy")
# Buffers some exporters write that the model recomputes.
_IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq)$")
_DUMMY_SEED = 0
_DUMMY_STD = 0.02


def load_model(model_dir: str | Path, *, dtype: torch.dtype, device: torch.device | str, load_format: str = "auto",
               parallel: ParallelState | None = None, expert_metrics: bool = False, attention_backend: str = "auto",
               kv_cache_dtype: torch.dtype | None = None) -> Dots1ForCausalLM:
    """The model described by ``model_dir``/config.json, with its checkpoint's weights (or random ones: "dummy").

    ``attention_backend`` (auto, torch, triton) is resolved here, on ``device``, for a cache of ``kv_cache_dtype``
    (default: ``dtype``); see ``model.attention_backend.resolve_attention_backend``.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}: use one of {', '.join(LOAD_FORMATS)}")
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {attention_backend!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    model_dir = Path(model_dir)
    config = ModelConfig.from_pretrained(model_dir)
    entries = None if load_format == "dummy" else read_checkpoint_headers(model_dir)
    with torch.device(device):
        model = Dots1ForCausalLM(config, parallel, expert_metrics=expert_metrics, dtype=dtype)
    attention = model.layers[0].self_attn
    windows = tuple(sorted({layer.self_attn.window for layer in model.layers}, key=lambda w: w or 0))
    model.attention_backend = resolve_attention_backend(attention_backend, device, dtype, kv_cache_dtype,
                                                        attention.head_dim,
                                                        attention.num_heads // attention.num_kv_heads, windows)
    if entries is None:
        initialize_dummy_weights(model)
    else:
        load_checkpoint(model, entries)
    if can_pack_weights(torch.device(device)):
        model.pack_weights_for_cpu()
    return model.eval()


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
        if target is None:
            raise ValueError(f"{entry.file}: unexpected tensor {key!r}: the model (per config.json) has no such weight")
        if entry.shape != target.shape:
            raise ValueError(f"{entry.file}: tensor {key!r} has shape {list(entry.shape)}, "
                             f"but config.json implies {list(target.shape)}")
        for canonical in target.covers:
            if canonical in covered:
                raise ValueError(f"{entry.file}: tensor {key!r} provides {canonical!r}, already given by "
                                 f"{covered[canonical]!r}")
            covered[canonical] = key
        plan.append(key)
    required = dict.fromkeys(key for target in targets.values() for key in target.covers)
    missing = [key for key in required if key not in covered]
    if missing:
        files = sorted({str(entry.file) for entry in entries.values()})
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"missing tensor {missing[0]!r}{more} in checkpoint {files}")
    return plan


def initialize_dummy_weights(model: Dots1ForCausalLM, seed: int = _DUMMY_SEED, std: float = _DUMMY_STD) -> None:
    """Deterministic random weights (norms at 1) for sizing and benchmarking without a checkpoint."""
    with torch.no_grad():
        for index, (name, param) in enumerate(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            generator = torch.Generator(device=param.device).manual_seed(seed + index)
            param.normal_(0.0, std, generator=generator)
