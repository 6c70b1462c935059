"""RoPE settings from ``rope_parameters`` (Transformers v5) or the legacy ``rope_theta`` / ``rope_scaling`` keys."""
from dataclasses import dataclass
from typing import Any

_DEFAULT_THETA = 10000.0
_COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_KEYS_BY_TYPE = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}
_REQUIRED_BY_TYPE = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "yarn": set(),
    "llama3": {"factor", "low_freq_factor", "high_freq_factor"},
}


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"  # default | linear | dynamic | yarn | llama3
    theta: float = _DEFAULT_THETA
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None


def parse_rope_config(raw: dict[str, Any], max_position_embeddings: int) -> RopeConfig:
    """Reads RoPE settings from a config.json dict the way Transformers standardises them."""
    params = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    if any(isinstance(value, dict) for value in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported by Dots1 (expected one flat dict)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _KEYS_BY_TYPE:
        raise ValueError(f"rope type {rope_type!r} is not supported "
                         f"(supported: {', '.join(sorted(_KEYS_BY_TYPE))})")
    unknown = sorted(set(params) - _COMMON_KEYS - _KEYS_BY_TYPE[rope_type])
    if unknown:
        raise ValueError(f"rope parameter(s) {unknown} are not supported for rope type {rope_type!r}")
    missing = sorted(key for key in _REQUIRED_BY_TYPE[rope_type] if params.get(key) is None)
    if missing:
        raise ValueError(f"rope type {rope_type!r} needs rope parameter(s) {missing}")
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"partial_rotary_factor {partial} is not supported (Dots1 rotates the whole head)")

    theta = params.get("rope_theta")
    if theta is None:
        theta = raw.get("rope_theta")
    original_max = None
    if rope_type in ("yarn", "llama3"):
        original_max = raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        original_max = int(original_max or max_position_embeddings)
    factor = params.get("factor")
    if factor is None:
        factor = max_position_embeddings / original_max if rope_type == "yarn" else 1.0
    return RopeConfig(
        rope_type=rope_type,
        theta=float(theta if theta is not None else _DEFAULT_THETA),
        factor=float(factor),
        original_max_position_embeddings=original_max,
        attention_factor=_optional_float(params.get("attention_factor")),
        beta_fast=_optional_float(params.get("beta_fast")),
        beta_slow=_optional_float(params.get("beta_slow")),
        mscale=_optional_float(params.get("mscale")),
        mscale_all_dim=_optional_float(params.get("mscale_all_dim")),
        truncate=bool(params.get("truncate", True)),
        low_freq_factor=_optional_float(params.get("low_freq_factor")),
        high_freq_factor=_optional_float(params.get("high_freq_factor")),
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
