"""The paged KV cache: per layer, K and V of shape [num_blocks, block_size, kv_heads_on_this_rank, head_dim]."""
import torch

from model.config import ModelConfig
from model.parallel import ParallelState


def _kv_heads_on_rank(config: ModelConfig, parallel: ParallelState | None) -> int:
    return (parallel or ParallelState()).shard_heads(config.num_key_value_heads, "num_key_value_heads")[1]


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype,
                             parallel: ParallelState | None = None) -> int:
    """Bytes one block takes on this rank over all layers, keys and values."""
    per_layer = block_size * _kv_heads_on_rank(config, parallel) * config.head_dim * dtype.itemsize
    return 2 * config.num_hidden_layers * per_layer


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str, parallel: ParallelState | None = None
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"KV cache needs at least one block of at least one token, got {num_blocks} x {block_size}")
    shape = (num_blocks, block_size, _kv_heads_on_rank(config, parallel), config.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)]
