"""The one rule for a server's context length (``max_model_len``): what was asked for, else the model's
``max_position_embeddings``; never above that, and never above what the KV cache holds once it is sized."""
import logging

logger = logging.getLogger(__name__)


def requested_max_model_len(requested: int | None, model_limit: int) -> int:
    """The context length asked for (or the model's), checked against the model; before the KV cache exists."""
    max_model_len = requested if requested is not None else model_limit
    if not 1 <= max_model_len <= model_limit:
        raise ValueError(f"max_model_len must be in [1, {model_limit}] (the model's max_position_embeddings), "
                         f"got {max_model_len}")
    return max_model_len


def resolve_max_model_len(requested: int | None, model_limit: int, kv_pool_tokens: int) -> int:
    """The context length requests get: the requested one, lowered (with a warning) to the KV cache's tokens."""
    max_model_len = requested_max_model_len(requested, model_limit)
    if max_model_len > kv_pool_tokens:
        logger.warning("max_model_len lowered from %d to %d: the KV cache holds no more", max_model_len,
                       kv_pool_tokens)
        max_model_len = kv_pool_tokens
    return max_model_len
