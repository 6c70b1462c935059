"""The paged KV cache: per layer, K and V of shape [num_blocks, block_size, kv_heads_on_this_rank, head_dim].

The cache is held in the model dtype or, with ``--kv-cache-dtype fp8``, in float8_e4m3fn: each layer stores
``x / scale`` (its attention layer's ``k_scale``/``v_scale``, 1.0 unless a checkpoint sets them) and attention
reads ``stored * scale`` back.
"""
import logging

import torch

from model.config import ModelConfig
from model.parallel import ParallelState

KV_CACHE_DTYPES = ("auto", "model", "fp8")
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
logger = logging.getLogger(__name__)


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, calibrated_scales: bool = False) -> torch.dtype:
    """"auto": float8_e4m3fn for a checkpoint with calibrated KV-cache scales (a kv_cache_scheme), else the model
    dtype; "model": the model dtype; "fp8": float8_e4m3fn."""
    if name == "auto" and calibrated_scales:
        logger.info("KV cache: float8_e4m3fn, as the checkpoint's kv_cache_scheme was calibrated for it "
                    "(--kv-cache-dtype model keeps the model dtype)")
        return FP8_KV_DTYPE
    if name in ("auto", "model"):
        return model_dtype
    if name == "fp8":
        return FP8_KV_DTYPE
    raise ValueError(f"unknown kv_cache_dtype {name!r}: use one of {', '.join(KV_CACHE_DTYPES)}")


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_KV_DTYPE


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x [..] -> float8_e4m3fn of x / scale, saturated to the finite range.

    Multiplies by the reciprocal in float32, as the Triton store kernel does, so both backends write the same bytes.
    """
    return (x.float() * (1.0 / scale)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def _kv_heads_on_rank(config: ModelConfig, parallel: ParallelState | None) -> int:
    return (parallel or ParallelState()).shard_heads(config.num_key_value_heads, "num_key_value_heads")[1]


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype,
                             parallel: ParallelState | None = None) -> int:
    """Bytes one block takes on this rank over all layers, keys and values, in the cache dtype ``dtype``."""
    per_layer = block_size * _kv_heads_on_rank(config, parallel) * config.head_dim * dtype.itemsize
    return 2 * config.num_hidden_layers * per_layer


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str, parallel: ParallelState | None = None
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed per-layer (key, value) caches in the cache dtype ``dtype``."""
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"KV cache needs at least one block of at least one token, got {num_blocks} x {block_size}")
    shape = (num_blocks, block_size, _kv_heads_on_rank(config, parallel), config.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)]
