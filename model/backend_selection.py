"""Choosing the attention and MoE backends once, at load, on the device that will serve.

"auto" is triton on CUDA and torch elsewhere; asked for explicitly, triton runs wherever Triton does (the CPU under
TRITON_INTERPRET=1 included). Either way triton must first pass its self-check on the real device (see
``model.self_check.select_backend`` for what a failure does). Self-checks load Triton only when they run.
"""
import logging

import torch

from model.attention_backend import AttentionBackend, TorchAttentionBackend, TritonAttentionBackend
from model.dots1 import Dots1ForCausalLM
from model.moe_backend import MoEBackend, TorchMoEBackend, TritonMoEBackend
from model.self_check import SelfCheckResult, select_backend

logger = logging.getLogger(__name__)


def resolve_attention_backend(requested: str, device: torch.device | str, dtype: torch.dtype,
                              kv_cache_dtype: torch.dtype | None = None, head_dim: int = 128,
                              query_heads_per_kv_head: int = 1, windows: tuple[int | None, ...] = (None,)
                              ) -> AttentionBackend:
    """The attention backend for ``requested``; triton's check runs the model's head size, query group, KV cache
    dtype and every attention window it uses."""
    def self_check() -> SelfCheckResult:
        from model import attention_self_check

        return attention_self_check.check_triton_attention(device, dtype, kv_cache_dtype, head_dim,
                                                           query_heads_per_kv_head, windows)

    return select_backend("attention", "--attention-backend", requested, torch.device(device), TorchAttentionBackend,
                          TritonAttentionBackend, self_check, logger)


def attention_backend_for(model: Dots1ForCausalLM, requested: str, device: torch.device | str, dtype: torch.dtype,
                          kv_cache_dtype: torch.dtype | None) -> AttentionBackend:
    """The attention backend for ``model``'s head size, query group and attention windows."""
    attention = model.layers[0].self_attn
    windows = tuple(sorted({layer.self_attn.window for layer in model.layers}, key=lambda w: w or 0))
    return resolve_attention_backend(requested, device, dtype, kv_cache_dtype, attention.head_dim,
                                     attention.num_heads // attention.num_kv_heads, windows)


def resolve_moe_backend(requested: str, device: torch.device | str, dtype: torch.dtype, fp8: bool = False,
                        has_moe_layers: bool = True) -> MoEBackend:
    """The MoE backend for ``requested``; triton's check covers the FP8 variants too with ``fp8``. A model without
    MoE layers needs no check."""
    def self_check() -> SelfCheckResult:
        from model.kernels.moe import self_check as moe_self_check

        return moe_self_check.check_fused_moe(device, dtype, fp8=fp8)

    if not has_moe_layers and requested in ("auto", "triton"):
        return TorchMoEBackend()
    return select_backend("MoE", "--moe-backend", requested, torch.device(device), TorchMoEBackend, TritonMoEBackend,
                          self_check, logger)
