"""Random Dots1 checkpoints written by Transformers, with weights that make every part of the network matter."""
from pathlib import Path
from typing import Any

import torch
from transformers import Dots1Config, Dots1ForCausalLM


def save_random_dots1(model_dir: Path, config: dict[str, Any], seed: int = 0) -> Dots1ForCausalLM:
    """Saves a seeded random model to ``model_dir`` and returns it (fp32).

    Weights are drawn large enough that every part moves the logits: norms away from 1, a non-zero
    e_score_correction_bias (random init leaves it zero, which would hide bias bugs) and router weights that
    separate the experts.
    """
    torch.manual_seed(seed)
    model = Dots1ForCausalLM(Dots1Config(**config)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("mlp.gate.weight"):
                param.copy_(0.5 * noise)
            else:
                param.copy_(0.15 * noise)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
    model.save_pretrained(model_dir)
    return model
