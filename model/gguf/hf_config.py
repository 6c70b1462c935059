"""A dots1 GGUF file's hyperparameters (``dots1.*`` metadata, tensor shapes) in config.json's terms."""
from typing import Any

from model.gguf.reader import GGUFMetadata

_SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID


def hf_config_dict(metadata: GGUFMetadata) -> dict[str, Any]:
    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"dots1.{name}", default)
        if value is None:
            raise ValueError(f"{metadata.path}: metadata key 'dots1.{name}' is missing")
        return value

    gating = metadata.get("dots1.expert_gating_func")
    if gating not in (None, _SIGMOID_GATING):
        raise ValueError(f"{metadata.path}: dots1.expert_gating_func is {gating}; Dots1 routes with sigmoid scores "
                         f"({_SIGMOID_GATING})")
    scaling = metadata.get("dots1.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{metadata.path}: dots1.rope.scaling.type is {scaling!r}; this engine reads RoPE scaling "
                         "from config.json checkpoints only")
    if "token_embd.weight" not in metadata.tensor_shapes:
        raise ValueError(f"{metadata.path}: tensor 'token_embd.weight' is missing")
    vocab_size = metadata.tensor_shapes["token_embd.weight"][0]
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(metadata.get("dots1.attention.key_length") or hidden // heads)
    value_dim = int(metadata.get("dots1.attention.value_length") or head_dim)
    if value_dim != head_dim:
        raise ValueError(f"{metadata.path}: dots1.attention.value_length {value_dim} differs from key_length "
                         f"{head_dim}; Dots1 uses one head_dim")
    kv_heads = metadata.get("dots1.attention.head_count_kv", heads)
    context = int(key("context_length"))
    return {
        "model_type": "dots1",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "attention_bias": "blk.0.attn_q.bias" in metadata.tensor_shapes,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": context,
        "sliding_window": None,  # llama.cpp's dots1 has no sliding layers
        "first_k_dense_replace": int(key("leading_dense_block_count", 0)),
        "n_routed_experts": int(key("expert_count")),
        "num_experts_per_tok": int(key("expert_used_count")),
        "n_shared_experts": int(key("expert_shared_count", 0)),
        "moe_intermediate_size": int(key("expert_feed_forward_length")),
        "norm_topk_prob": bool(key("expert_weights_norm", False)),
        "routed_scaling_factor": float(key("expert_weights_scale", 1.0)),
        "tie_word_embeddings": "output.weight" not in metadata.tensor_shapes,
    }
