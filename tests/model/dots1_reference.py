"""Tiny random Dots1 checkpoints written by Transformers, and Transformers' logits for them (the test oracle)."""
import json
from pathlib import Path
from typing import Any

import torch
from random_dots1 import save_random_dots1
from transformers import Dots1ForCausalLM
from transformers.cache_utils import DynamicCache

BASE_CONFIG: dict[str, Any] = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-5,
    max_position_embeddings=128, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
)


def build_reference(model_dir: Path, seed: int = 0, legacy_rope: bool = False, **overrides: Any) -> Dots1ForCausalLM:
    """Saves a random Transformers Dots1 model to ``model_dir`` and returns it (fp32, eager attention)."""
    model = save_random_dots1(model_dir, {**BASE_CONFIG, **overrides, "attn_implementation": "eager"}, seed)
    if legacy_rope:
        _rewrite_rope_as_legacy(model_dir / "config.json")
    return model


def _rewrite_rope_as_legacy(path: Path) -> None:
    """config.json the way pre-v5 checkpoints (like the published dots.llm1) spell RoPE."""
    raw = json.loads(path.read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    raw["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **params}
    path.write_text(json.dumps(raw, indent=2))


@torch.no_grad()
def reference_generate(model: Dots1ForCausalLM, prompt: list[int], steps: int) -> tuple[torch.Tensor, list[int],
                                                                                          list[torch.Tensor]]:
    """Greedy decoding with a DynamicCache: (prompt logits [P, V], new tokens, logits of each decode step [V])."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    prompt_logits = out.logits[0].float()
    tokens, step_logits = [], []
    next_token = int(prompt_logits[-1].argmax())
    for _ in range(steps):
        tokens.append(next_token)
        out = model(input_ids=torch.tensor([[next_token]]), past_key_values=cache, use_cache=True)
        logits = out.logits[0, -1].float()
        step_logits.append(logits)
        next_token = int(logits.argmax())
    return prompt_logits, tokens, step_logits
