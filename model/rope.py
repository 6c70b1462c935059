"""Rotary position embeddings (rotate-half style over the whole head), with Transformers' scaling variants.

The frequency formulas follow Transformers' ``modeling_rope_utils`` operation for operation in float32, so
positions rotate exactly as in the reference.
"""
import math

import torch
from torch import nn

from model.rope_config import RopeConfig


def _base_inv_freq(theta: float | torch.Tensor, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [D/2]
    return 1.0 / (theta ** exponents)


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1
    original_max = rope.original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _llama3_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(rope.theta, dim)
    old_context_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_context_len / rope.low_freq_factor
    high_freq_wavelen = old_context_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> None:
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.attention_scaling = 1.0
        if rope.rope_type in ("default", "dynamic"):
            inv_freq = _base_inv_freq(rope.theta, head_dim)
        elif rope.rope_type == "linear":
            inv_freq = _base_inv_freq(rope.theta, head_dim) / rope.factor
        elif rope.rope_type == "yarn":
            inv_freq, self.attention_scaling = _yarn_inv_freq(rope, head_dim)
        elif rope.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(rope, head_dim)
        else:
            raise ValueError(f"rope type {rope.rope_type!r} is not supported")
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)  # [D/2] float32

    def forward(
        self, positions: torch.Tensor, seq_lens: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, D] for each token; ``seq_lens`` [T] (its sequence's length) drives dynamic scaling."""
        inv_freq = self.inv_freq[None, :]  # [1, D/2]
        if self.rope.rope_type == "dynamic" and seq_lens is not None:
            inv_freq = self._dynamic_inv_freq(seq_lens)
        freqs = positions[:, None].float() * inv_freq  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def _dynamic_inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """NTK-aware base per token, from its sequence's length once it exceeds max_position_embeddings."""
        dim, factor, max_len = self.head_dim, self.rope.factor, self.max_position_embeddings
        lengths = torch.clamp(seq_lens, min=max_len)  # [T] int64
        base = self.rope.theta * ((factor * lengths / max_len) - (factor - 1)) ** (dim / (dim - 2))  # [T] float32
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=seq_lens.device).float() / dim  # [D/2]
        scaled = 1.0 / (base[:, None] ** exponents[None, :])  # [T, D/2]
        return torch.where((seq_lens > max_len)[:, None], scaled, self.inv_freq[None, :])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos, sin [T, D]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]
