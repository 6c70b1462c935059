"""Dots1 self-attention: fused q/k/v projection, per-head q/k RMSNorm before RoPE, paged KV cache."""
import torch
from torch import nn

from model.attention_backend import AttentionStep
from model.config import ModelConfig
from model.kv_scales import kv_scale_targets
from model.linear import ColumnParallelLinear, RowParallelLinear
from model.norm import RMSNorm
from model.parallel import ParallelState
from model.rope import apply_rotary
from model.weights import WeightTarget


class Dots1Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, parallel: ParallelState, dtype: torch.dtype) -> None:
        super().__init__()
        head_dim = config.head_dim
        self.head_dim = head_dim
        first_head, self.num_heads = parallel.shard(config.num_attention_heads, "num_attention_heads")
        first_kv_head, self.num_kv_heads = parallel.shard_heads(config.num_key_value_heads, "num_key_value_heads")
        self.scale = head_dim ** -0.5
        self.window = config.window_of_layer(layer_id)
        # FP8 KV cache scales (the cache stores x / scale); a loader may set them from the checkpoint.
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.has_checkpoint_kv_scales = config.has_kv_cache_scales
        q_shard = (first_head * head_dim, self.num_heads * head_dim)
        kv_shard = (first_kv_head * head_dim, self.num_kv_heads * head_dim)
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size,
            [config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim,
             config.num_key_value_heads * head_dim],
            config.attention_bias, parallel, dtype, names=["q_proj", "k_proj", "v_proj"],
            shards=[q_shard, kv_shard, kv_shard],
        )
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        config.attention_bias, parallel, dtype, name="o_proj")
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor,
                value_cache: torch.Tensor, attention: AttentionStep) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        query, key, value = self.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
        query = self.q_norm(query.view(num_tokens, self.num_heads, self.head_dim))  # [T, Hq, D]
        key = self.k_norm(key.view(num_tokens, self.num_kv_heads, self.head_dim))  # [T, Hkv, D]
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        query = apply_rotary(query, cos, sin)
        key = apply_rotary(key, cos, sin)
        out = attention(self, query, key, value, key_cache, value_cache)  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, q_size))

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        targets = self.qkv_proj.weight_targets([f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"])
        targets |= self.o_proj.weight_targets(f"{prefix}.o_proj")
        targets |= self.q_norm.weight_targets(f"{prefix}.q_norm")
        targets |= self.k_norm.weight_targets(f"{prefix}.k_norm")
        if self.has_checkpoint_kv_scales:
            targets |= kv_scale_targets(self, prefix)
        return targets
