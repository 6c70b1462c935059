"""The Dots1 architecture as this engine runs it, read from a checkpoint's config.json.

Every option Transformers' ``Dots1Config`` has is honoured; an option or value this engine cannot honour is refused
with a ValueError that names it, so a checkpoint never runs with a silently different architecture.
"""
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.quantization import Fp8Scheme, parse_quantization_config
from model.rope_config import RopeConfig, parse_rope_config

if TYPE_CHECKING:  # the gguf package loads only when a GGUF file is read
    from model.gguf.reader import GGUFMetadata

logger = logging.getLogger(__name__)

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# Transformers' Dots1Config defaults, used when config.json leaves an option out.
_SLIDING_WINDOW_DEFAULT = 4096
_MAX_WINDOW_LAYERS_DEFAULT = 62

# Keys that describe the checkpoint or training but do not change the forward pass.
_METADATA_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "initializer_range",
    "attention_dropout", "output_router_logits", "router_aux_loss_coef", "bos_token_id", "eos_token_id",
    "pad_token_id", "sep_token_id", "decoder_start_token_id", "_name_or_path", "name_or_path", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "id2label", "label2id", "num_labels", "problem_type", "tokenizer_class", "prefix",
    "task_specific_params", "finetuning_task", "tie_encoder_decoder", "add_cross_attention",
    "cross_attention_hidden_size",
    "pruned_heads", "auto_map", "use_sliding_window",
})
# Keys published dots.llm1 configs carry that Transformers' Dots1 ignores; each is accepted with an info line.
_IGNORED_BY_DOTS1 = {"pretraining_tp": "Transformers' Dots1 does not split its matmuls by it"}
_LOGGED: set[str] = set()
_ROPE_KEYS = frozenset({"rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
                        "original_max_position_embeddings"})


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_bias: bool
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    sliding_window: int | None
    max_window_layers: int
    layer_types: tuple[str, ...]
    first_k_dense_replace: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    moe_intermediate_size: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    tie_word_embeddings: bool
    quantization: Fp8Scheme | None = None  # how the checkpoint's weights are quantized (quantization_config)

    def __post_init__(self) -> None:
        self._validate()

    @classmethod
    def from_gguf_metadata(cls, metadata: "GGUFMetadata") -> "ModelConfig":
        """The Dots1 architecture of a GGUF file's metadata, validated like a config.json."""
        from model.gguf.hf_config import hf_config_dict

        return cls.from_dict(hf_config_dict(metadata), source=f"{metadata.path} (GGUF metadata)")

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        """From ``model_dir``/config.json, or from the metadata of a dots1 GGUF file (a path ending in .gguf)."""
        if str(model_dir).endswith(".gguf"):
            from model.gguf.reader import read_metadata

            return cls.from_gguf_metadata(read_metadata(model_dir))
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config.json not found; a Hugging Face model directory needs one")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Builds the config from config.json's contents, applying Dots1Config's defaults for missing keys."""
        try:
            return cls._from_dict(raw)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type != "dots1":
            raise ValueError(f"unsupported model_type {model_type!r}: this engine runs 'dots1' (Dots1ForCausalLM)")
        raw = _normalise_revisions(raw)
        _refuse_unsupported_values(raw)
        known = ({f for f in cls.__dataclass_fields__} - {"quantization"}) | _METADATA_KEYS | _ROPE_KEYS
        known |= {"hidden_act", "moe_layer_freq", "scoring_func", "topk_method", "quantization_config"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}: refusing to guess how they change the model")

        hidden_size = int(raw.get("hidden_size", 4608))
        num_heads = int(raw.get("num_attention_heads", 32))
        num_layers = int(raw.get("num_hidden_layers", 62))
        head_dim = raw.get("head_dim") or hidden_size // num_heads
        num_kv_heads = raw.get("num_key_value_heads")
        sliding_window = raw.get("sliding_window", _SLIDING_WINDOW_DEFAULT)
        max_window_layers = raw.get("max_window_layers", _MAX_WINDOW_LAYERS_DEFAULT)
        layer_types = raw.get("layer_types")
        if layer_types is None:
            layer_types = [
                SLIDING_ATTENTION if sliding_window is not None and i >= max_window_layers else FULL_ATTENTION
                for i in range(num_layers)
            ]
        max_position_embeddings = int(raw.get("max_position_embeddings", 2048))
        _check_use_sliding_window(raw, layer_types)
        return cls(
            vocab_size=int(raw.get("vocab_size", 152064)),
            hidden_size=hidden_size,
            intermediate_size=int(raw.get("intermediate_size", 10944)),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=int(num_kv_heads if num_kv_heads is not None else num_heads),
            head_dim=int(head_dim),
            attention_bias=bool(raw.get("attention_bias", False)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=parse_rope_config(raw, max_position_embeddings),
            max_position_embeddings=max_position_embeddings,
            sliding_window=None if sliding_window is None else int(sliding_window),
            max_window_layers=int(max_window_layers if max_window_layers is not None else num_layers),
            layer_types=tuple(layer_types),
            first_k_dense_replace=int(raw.get("first_k_dense_replace") or 0),
            n_routed_experts=int(raw.get("n_routed_experts") or 0),
            num_experts_per_tok=int(raw.get("num_experts_per_tok") or 0),
            n_shared_experts=int(raw.get("n_shared_experts") or 0),
            moe_intermediate_size=int(raw.get("moe_intermediate_size", 1408)),
            n_group=int(raw.get("n_group") or 1),
            topk_group=int(raw.get("topk_group") or 1),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            quantization=parse_quantization_config(raw.get("quantization_config")),
        )

    @property
    def has_kv_cache_scales(self) -> bool:
        """Whether the checkpoint holds per-layer FP8 KV-cache scales (its quantization_config's kv_cache_scheme)."""
        return self.quantization is not None and self.quantization.kv_cache_scales

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense_replace

    def is_sliding_layer(self, layer_id: int) -> bool:
        return self.layer_types[layer_id] == SLIDING_ATTENTION

    def window_of_layer(self, layer_id: int) -> int | None:
        """Keys a query may see, counting itself, or None for full causal attention."""
        return self.sliding_window if self.is_sliding_layer(layer_id) else None

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def has_moe_layers(self) -> bool:
        return bool(self.moe_layer_ids)

    def _validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        for layer_type in self.layer_types:
            if layer_type not in (FULL_ATTENTION, SLIDING_ATTENTION):
                raise ValueError(f"layer_types entry {layer_type!r} is not supported "
                                 f"(only {FULL_ATTENTION!r} and {SLIDING_ATTENTION!r})")
        if SLIDING_ATTENTION in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer for sliding layers, got {self.sliding_window}")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            raise ValueError(f"intermediate_size must be positive for dense layers, got {self.intermediate_size}")
        if self.has_moe_layers:
            self._validate_moe()

    def _validate_moe(self) -> None:
        for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive when MoE layers exist, got {getattr(self, name)}")
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts ({self.n_routed_experts}) must be divisible by "
                             f"n_group ({self.n_group})")
        group_size = self.n_routed_experts // self.n_group
        if group_size < 2:
            raise ValueError(f"n_group ({self.n_group}) leaves fewer than 2 experts per group; group scores use the "
                             "top-2 experts of each group")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be between 1 and n_group ({self.n_group})")
        if self.num_experts_per_tok > self.topk_group * group_size:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in the "
                             f"topk_group ({self.topk_group}) selected groups")


def _normalise_revisions(raw: dict[str, Any]) -> dict[str, Any]:
    """The current spelling of every published dots.llm1 config revision; what changes nothing is dropped.

    The first uploads named the router ``"scoring_func": "noaux_tc"`` (later ``"topk_method": "noaux_tc"`` with
    ``"scoring_func": "sigmoid"``) and carried keys Transformers' Dots1 ignores; older quantized checkpoints name
    ``quantization_config`` ``compression_config``.
    """
    raw = dict(raw)
    if raw.get("scoring_func") == "noaux_tc":
        if raw.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError(f"scoring_func 'noaux_tc' (the first upload's name of topk_method 'noaux_tc') "
                             f"contradicts topk_method {raw['topk_method']!r}")
        _info("scoring_func 'noaux_tc' is the first dots.llm1 upload's spelling of topk_method 'noaux_tc' with "
              "sigmoid scores; reading it so")
        raw["scoring_func"], raw["topk_method"] = "sigmoid", "noaux_tc"
    if "compression_config" in raw:
        if raw.get("quantization_config") not in (None, raw["compression_config"]):
            raise ValueError("both compression_config and quantization_config are given, and they differ")
        _info("compression_config is the older name of quantization_config; reading it so")
        raw["quantization_config"] = raw.pop("compression_config")
    for key, why in _IGNORED_BY_DOTS1.items():
        if key in raw:
            _info(f"ignoring {key}={raw.pop(key)!r}: {why}")
    if raw.get("moe_layer_freq", 1) == 1 and "moe_layer_freq" in raw:
        _info("moe_layer_freq 1: every layer from first_k_dense_replace on is MoE, as Dots1 builds it")
    return raw


def _check_use_sliding_window(raw: dict[str, Any], layer_types: list[str]) -> None:
    """use_sliding_window is ignored by Transformers' Dots1 (windows follow sliding_window and layer_types); it is
    accepted where it agrees with them and refused where reading it would change which layers slide."""
    if "use_sliding_window" not in raw:
        return
    use = raw["use_sliding_window"]
    slides = SLIDING_ATTENTION in layer_types
    if bool(use) != slides:
        raise ValueError(f"use_sliding_window {use!r} contradicts sliding_window/max_window_layers/layer_types, "
                         f"which give {'some' if slides else 'no'} sliding layers")
    _info(f"use_sliding_window {use!r} agrees with sliding_window and layer_types (which Dots1 follows)")


def _info(message: str) -> None:
    """Logs ``message`` once per process (config.json is read by the executor and by the loader)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.info("config.json: %s", message)


def _refuse_unsupported_values(raw: dict[str, Any]) -> None:
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
    if raw.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"scoring_func {raw['scoring_func']!r} is not supported (Dots1 routes with 'sigmoid')")
    if raw.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError(f"topk_method {raw['topk_method']!r} is not supported (Dots1 uses 'noaux_tc')")
    if raw.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"moe_layer_freq {raw['moe_layer_freq']!r} is not supported (Dots1 uses 1: every layer "
                         "after first_k_dense_replace is MoE)")
