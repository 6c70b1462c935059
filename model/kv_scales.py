"""Static per-layer FP8 KV-cache scales from a checkpoint whose quantization_config has a kv_cache_scheme.

llm-compressor writes ``model.layers.N.self_attn.k_scale`` and ``...v_scale`` (scalars or shape [1], any float
dtype); older exports spell them ``...self_attn.k_proj.output_scale`` and ``...v_proj.output_scale``. Each sets the
attention layer's ``k_scale``/``v_scale``, the same scalar on every tensor-parallel rank.
"""
import math
import re

from torch import nn

from model.weights import FLOAT, CheckpointTensor, WeightTarget

# Every checkpoint key that holds a KV-cache scale, in either spelling.
KV_SCALE_KEY = re.compile(r"\.self_attn\.(k_scale|v_scale|k_proj\.output_scale|v_proj\.output_scale)$")
SCALAR_SHAPES = ((1,),)  # besides the 0-d shape ()


def kv_scale_targets(attention: nn.Module, prefix: str) -> dict[str, WeightTarget]:
    """Both spellings of ``prefix``'s k and v scales; each spelling covers the canonical ``prefix.k_scale``/``v_scale``,
    so a checkpoint must give each scale exactly once."""
    targets = {}
    for which in ("k", "v"):
        canonical = f"{prefix}.{which}_scale"
        target = WeightTarget((), _setter(attention, f"{which}_scale"), (canonical,), FLOAT, SCALAR_SHAPES)
        targets[canonical] = targets[f"{prefix}.{which}_proj.output_scale"] = target
    return targets


def read_kv_scale(tensor: CheckpointTensor) -> float:
    """The scale as a Python float; a non-positive or non-finite one is refused (the cache stores x / scale)."""
    value = float(tensor.read().float().reshape(()))
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"a KV-cache scale must be a positive finite number, got {value}")
    return value


def _setter(attention: nn.Module, attribute: str):
    def load(tensor: CheckpointTensor) -> None:
        setattr(attention, attribute, read_kv_scale(tensor))
    return load
