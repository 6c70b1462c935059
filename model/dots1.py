"""Dots1ForCausalLM over a flat, unpadded batch and a paged KV cache."""
import torch
from torch import nn

from model.attention import Dots1Attention
from model.attention_backend import AttentionBackend, AttentionStep, TorchAttentionBackend
from model.config import ModelConfig
from model.embedding import ParallelLMHead, VocabParallelEmbedding
from model.forward_batch import ForwardBatch
from model.mlp import GatedMLP
from model.moe import Dots1MoE
from model.moe_backend import MoEBackend, TorchMoEBackend
from model.norm import RMSNorm
from model.parallel import ParallelState
from model.rope import RotaryEmbedding
from model.weights import WeightTarget


class Dots1DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, parallel: ParallelState, dtype: torch.dtype,
                 count_experts: bool, moe_backend: MoEBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Dots1Attention(config, layer_id, parallel, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp: Dots1MoE | GatedMLP
        if config.is_moe_layer(layer_id):
            self.mlp = Dots1MoE(config, parallel, dtype, count_experts, moe_backend)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, parallel, dtype)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor,
                value_cache: torch.Tensor, attention: AttentionStep,
                real_tokens: torch.Tensor | None = None) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, key_cache, value_cache, attention)
        if isinstance(self.mlp, Dots1MoE):
            return hidden + self.mlp(self.post_attention_layernorm(hidden), real_tokens)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        targets = self.input_layernorm.weight_targets(f"{prefix}.input_layernorm")
        targets |= self.post_attention_layernorm.weight_targets(f"{prefix}.post_attention_layernorm")
        targets |= self.self_attn.weight_targets(f"{prefix}.self_attn")
        return targets | self.mlp.weight_targets(f"{prefix}.mlp")


class Dots1ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState | None = None, expert_metrics: bool = False,
                 dtype: torch.dtype = torch.float32, moe_backend: MoEBackend | None = None,
                 attention_backend: AttentionBackend | None = None) -> None:
        """Both backends default to the torch reference; ``model.backend_selection`` chooses them at load."""
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend or TorchAttentionBackend()
        self.parallel = parallel or ParallelState()
        self.moe_layer_ids = config.moe_layer_ids
        self.expert_metrics = expert_metrics
        self.moe_backend: MoEBackend = moe_backend or TorchMoEBackend()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, self.parallel, dtype)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)
        self.layers = nn.ModuleList()
        for layer_id in range(config.num_hidden_layers):
            self.layers.append(Dots1DecoderLayer(config, layer_id, self.parallel, dtype, expert_metrics,
                                                 self.moe_backend))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, self.parallel, dtype,
                                      tied_to=self.embed_tokens if config.tie_word_embeddings else None)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Runs the batch's new tokens, writing their K/V into ``kv_caches``.

        Returns float32 logits [len(batch.logits_indices), vocab_size] for the tokens batch.logits_indices names.
        Rows past ``batch.real_tokens`` (a captured graph's padding) run like any other but count for no expert.
        """
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} KV cache layers, got {len(kv_caches)}")
        block_size = kv_caches[0][0].shape[1]
        attention = AttentionStep.prepare(self.attention_backend, batch, block_size)
        hidden = self.embed_tokens(batch.input_ids)  # [T, H]
        seq_lens = None
        if self.config.rope.rope_type == "dynamic":
            seq_lens = torch.repeat_interleave(batch.context_lens.long(), batch.query_start_loc.diff(),
                                               output_size=batch.num_tokens)  # [T]
        cos, sin = self.rotary(batch.positions, seq_lens, hidden.dtype)  # [T, D]
        for layer, (key_cache, value_cache) in zip(self.layers, kv_caches):
            hidden = layer(hidden, cos, sin, key_cache, value_cache, attention, batch.real_tokens)
        hidden = self.norm(hidden.index_select(0, batch.logits_indices))  # [L, H]
        return self.lm_head(hidden)

    @property
    def graph_safe(self) -> bool:
        """True when a decode forward makes no host sync (so a CUDA graph can capture it): the attention backend
        and, if the model has MoE layers, the MoE backend say so; dense blocks always are."""
        return self.attention_backend.graph_safe and (not self.moe_layer_ids or self.moe_backend.graph_safe)

    def pack_weights_for_cpu(self) -> None:
        """Re-lays out every projection weight for oneDNN (see ``model.linear.pack_weight``); call once after
        loading, on the CPU only. Embedding and norm weights stay as they are."""
        for module in list(self.modules()):
            if module is not self and hasattr(module, "pack_weights"):
                module.pack_weights()

    def take_expert_counts(self) -> tuple[list[int], torch.Tensor] | None:
        """(MoE layer ids, int64 CPU counts [n_moe_layers, n_experts]) accumulated since the last call, then reset."""
        if not self.expert_metrics:
            return None
        moe_blocks = [self.layers[layer_id].mlp for layer_id in self.moe_layer_ids]
        if not moe_blocks:
            return [], torch.zeros(0, self.config.n_routed_experts, dtype=torch.int64)
        counts = torch.stack([block.expert_counts for block in moe_blocks]).cpu()
        for block in moe_blocks:
            block.expert_counts.zero_()
        return list(self.moe_layer_ids), counts

    def weight_targets(self) -> dict[str, WeightTarget]:
        """Every checkpoint key this model accepts, mapped to where its (sharded) data goes."""
        targets = self.embed_tokens.weight_targets("model.embed_tokens.weight")
        for layer_id, layer in enumerate(self.layers):
            targets |= layer.weight_targets(f"model.layers.{layer_id}")
        targets |= self.norm.weight_targets("model.norm")
        return targets | self.lm_head.weight_targets("lm_head.weight")
