"""The mid-size random Dots1 configuration every model-level benchmark uses (issue 2's benchmark config)."""
from pathlib import Path

import torch

MID_SIZE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, head_dim=64,
                n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1,
                norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-5, max_position_embeddings=4096,
                sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def write_mid_size_checkpoint(model_dir: Path, config: dict | None = None) -> None:
    """The mid-size config (or ``config``) with Transformers' seeded random init, saved in bf16, with a non-zero
    routing bias."""
    from transformers import Dots1Config, Dots1ForCausalLM

    torch.manual_seed(0)
    reference = Dots1ForCausalLM(Dots1Config(**(config or MID_SIZE))).to(torch.bfloat16)
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.05 * torch.randn(buffer.shape))
    reference.save_pretrained(model_dir)
