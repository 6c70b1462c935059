"""Which weights are FP8 and how: a checkpoint's compressed-tensors ``quantization_config``, or ``--quantization fp8``.

Only the float8 schemes this engine runs are accepted (llm-compressor's FP8 and FP8_DYNAMIC: e4m3 weights with one
static scale per output channel or per tensor, activations quantized per token at run time or not at all), plus
an optional static per-tensor float8 ``kv_cache_scheme`` (per-layer k_scale/v_scale, see ``model.kv_scales``);
anything else in a quantization_config is refused with a ValueError that names it.
"""
import re
from dataclasses import dataclass
from typing import Any

QUANTIZATION_METHODS = ("fp8",)  # what --quantization accepts

_CONFIG_KEYS = {"quant_method", "format", "quantization_status", "ignore", "kv_cache_scheme", "sparsity_config",
                "config_groups", "global_compression_ratio", "version", "transform_config"}
_GROUP_KEYS = {"targets", "weights", "input_activations", "output_activations", "format"}
_WEIGHT_KEYS = {"num_bits", "type", "strategy", "symmetric", "dynamic", "group_size", "block_structure", "observer",
                "observer_kwargs", "actorder", "zp_dtype", "scale_dtype"}


@dataclass(frozen=True)
class Fp8Scheme:
    """float8 e4m3 Linear weights with per-output-channel scales (per-tensor ones are expanded to every row)."""

    weight_strategy: str = "channel"  # the checkpoint's scale layout: "channel" [out, 1] or "tensor" [1]
    dynamic_activations: bool = True  # activations quantized per token at run time (W8A8); False: weight-only
    ignore: tuple[str, ...] = ()  # module names and "re:" patterns left in high precision
    targets: tuple[str, ...] = ("Linear",)  # "Linear" or "re:" patterns of the modules quantized
    online: bool = False  # quantized while loading a high-precision checkpoint (--quantization fp8)
    kv_cache_scales: bool = False  # kv_cache_scheme: per-layer static k_scale/v_scale for a float8 KV cache

    def quantizes(self, module_name: str) -> bool:
        """Whether the Linear module ``module_name`` (checkpoint naming) holds FP8 weights."""
        if any(_matches(pattern, module_name) for pattern in self.ignore):
            return False
        return any(target == "Linear" or _matches(target, module_name) for target in self.targets)

    def describe(self) -> str:
        source = "quantized at load (--quantization fp8)" if self.online else f"per {self.weight_strategy} scales"
        activations = "activations per token (W8A8)" if self.dynamic_activations else "weight-only"
        return f"float8_e4m3fn weights, {source}, {activations}"


def online_fp8_scheme() -> Fp8Scheme:
    return Fp8Scheme(online=True)


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def parse_quantization_config(raw: Any) -> Fp8Scheme | None:
    """The scheme a config.json ``quantization_config`` describes; None when there is none."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"quantization_config must be an object, got {type(raw).__name__}")
    method = raw.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(f"quantization_config quant_method {method!r} is not supported (only 'compressed-tensors' "
                         "float8 checkpoints, or --quantization fp8 on an unquantized one)")
    unknown = sorted(set(raw) - _CONFIG_KEYS)
    if unknown:
        raise ValueError(f"quantization_config has unknown key(s) {unknown}: refusing to guess what they change")
    _refuse_format(raw.get("format"), "quantization_config")
    status = raw.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(f"quantization_config quantization_status {status!r} is not supported (only 'compressed': "
                         "float8 weights with their scales)")
    for key in ("sparsity_config", "transform_config"):
        if raw.get(key):
            raise ValueError(f"quantization_config {key} is not supported (got {raw[key]!r})")
    kv_cache_scales = _parse_kv_cache_scheme(raw.get("kv_cache_scheme"))
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(name, str) for name in ignore):
        raise ValueError(f"quantization_config ignore must be a list of module names, got {ignore!r}")
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("quantization_config config_groups must name at least one group")
    schemes = {name: _parse_group(name, group) for name, group in groups.items()}
    kinds = {(strategy, dynamic) for strategy, dynamic, _ in schemes.values()}
    if len(kinds) > 1:
        raise ValueError(f"quantization_config config_groups mix schemes {sorted(kinds)}: only one FP8 scheme "
                         "for every quantized module is supported")
    [(strategy, dynamic)] = kinds
    targets = tuple(target for _, _, group_targets in schemes.values() for target in group_targets)
    return Fp8Scheme(weight_strategy=strategy, dynamic_activations=dynamic, ignore=tuple(ignore), targets=targets,
                     kv_cache_scales=kv_cache_scales)


def _parse_kv_cache_scheme(scheme: Any) -> bool:
    """Whether the checkpoint carries static per-layer float8 KV-cache scales (the only kv_cache_scheme run)."""
    if scheme is None:
        return False
    where = "quantization_config kv_cache_scheme"
    if not isinstance(scheme, dict):
        raise ValueError(f"{where} must be an object or null, got {scheme!r}")
    unknown = sorted(set(scheme) - _WEIGHT_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}")
    _require_float8(scheme, where)
    strategy = scheme.get("strategy")
    if strategy != "tensor":
        raise ValueError(f"{where} strategy {strategy!r} is not supported (only 'tensor': one k_scale and one "
                         "v_scale per layer)")
    if scheme.get("dynamic", False):
        raise ValueError(f"{where}: dynamic KV-cache scales are not supported (only static per-layer scales from "
                         "the checkpoint)")
    for key in ("group_size", "block_structure", "actorder"):
        if scheme.get(key):
            raise ValueError(f"{where} {key} {scheme[key]!r} is not supported")
    return True


def _refuse_format(value: Any, where: str) -> None:
    if value not in (None, "float-quantized"):
        what = {"pack-quantized": "int4/int8 weights packed into int32",
                "int-quantized": "int8 weights", "naive-quantized": "fake-quantized weights",
                "marlin-24": "2:4 sparse int4 weights", "nvfp4-pack-quantized": "packed fp4 weights"}.get(value, "")
        raise ValueError(f"{where} format {value!r}{f' ({what})' if what else ''} is not supported (only "
                         "'float-quantized': float8 e4m3 weights)")


def _parse_group(name: str, group: Any) -> tuple[str, bool, tuple[str, ...]]:
    """(weight strategy, dynamic per-token activations, targets) of one config group."""
    where = f"quantization_config group {name!r}"
    if not isinstance(group, dict):
        raise ValueError(f"{where} must be an object")
    unknown = sorted(set(group) - _GROUP_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}")
    _refuse_format(group.get("format"), where)
    targets = group.get("targets")
    if not isinstance(targets, list) or not targets:
        raise ValueError(f"{where} targets must be a non-empty list")
    for target in targets:
        if target != "Linear" and not (isinstance(target, str) and target.startswith("re:")):
            raise ValueError(f"{where} target {target!r} is not supported (only 'Linear' and 're:' patterns)")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise ValueError(f"{where} has no weights scheme")
    unknown = sorted(set(weights) - _WEIGHT_KEYS)
    if unknown:
        raise ValueError(f"{where} weights have unknown key(s) {unknown}")
    _require_float8(weights, f"{where} weights")
    strategy = weights.get("strategy")
    if strategy in ("group", "block") or weights.get("group_size") or weights.get("block_structure"):
        kind = "group" if strategy == "group" or weights.get("group_size") else "block"
        raise ValueError(f"{where} weights: {kind}-wise scales are not supported (only 'channel' and 'tensor')")
    if strategy not in ("channel", "tensor"):
        raise ValueError(f"{where} weights strategy {strategy!r} is not supported (only 'channel' and 'tensor')")
    if weights.get("dynamic", False):
        raise ValueError(f"{where} weights: dynamic weight scales are not supported (static scales only)")
    if weights.get("actorder"):
        raise ValueError(f"{where} weights actorder {weights['actorder']!r} is not supported")
    if group.get("output_activations") is not None:
        raise ValueError(f"{where} output_activations quantization is not supported")
    activations = group.get("input_activations")
    if activations is None:
        return strategy, False, tuple(targets)
    if not isinstance(activations, dict):
        raise ValueError(f"{where} input_activations must be an object or null")
    _require_float8(activations, f"{where} input_activations")
    if not activations.get("dynamic", False):
        raise ValueError(f"{where} input_activations: static activation scales are not supported (only dynamic "
                         "per-token quantization)")
    if activations.get("strategy") != "token":
        raise ValueError(f"{where} input_activations strategy {activations.get('strategy')!r} is not supported "
                         "(only dynamic 'token')")
    return strategy, True, tuple(targets)


def _require_float8(args: dict[str, Any], where: str) -> None:
    if args.get("type") != "float" or args.get("num_bits") != 8:
        raise ValueError(f"{where}: {args.get('num_bits')}-bit {args.get('type')!r} is not supported (only 8-bit "
                         "'float', e4m3)")
    if args.get("symmetric") is False:
        raise ValueError(f"{where}: asymmetric quantization (zero points) is not supported")
