"""KV-cache events as the block manager records them, and their encoding in vLLM's wire layout.

vLLM (``vllm/distributed/kv_events.py``) declares its batch and events as msgspec structs with ``array_like=True``
(the events also ``tag=True``, ``omit_defaults=True``), so a batch is the MessagePack array
``[ts, [event, ...], data_parallel_rank]`` and each event an array whose first element is its class name:

- ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name]``
  (the later fields ``extra_keys``, ``group_idx``, ``kv_cache_spec_kind``, ``kv_cache_spec_sliding_window`` have
  defaults and are omitted, as msgspec omits trailing defaults)
- ``["BlockRemoved", block_hashes, medium]``
- ``["AllBlocksCleared"]``

Hashes go out as 8-byte big-endian ``bytes`` (vLLM's ``ExternalBlockHash`` is bytes or int): llm-d's adapter reads
the last 8 bytes of a bin, while a small int would arrive as a narrow msgpack integer it rejects.
"""
from dataclasses import dataclass

import msgpack

MEDIUM = "GPU"  # vLLM's name for the engine's own KV pool (the first tier for routers), whatever the device
DATA_PARALLEL_RANK = 0  # one engine core per replica; vLLM's publisher fills in its rank the same way
HASH_MASK = (1 << 64) - 1


@dataclass(slots=True)
class BlockStored:
    """A run of newly cached full blocks of one sequence, each the child of the one before."""

    block_hashes: list[int]
    parent_block_hash: int | None  # of the block before the first; None at the start of a sequence
    token_ids: list[tuple[int, ...]]  # one tuple per block, flattened on the publisher thread


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[int]  # evicted from the prefix cache


@dataclass(slots=True)
class AllBlocksCleared:
    pass


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


def hash_bytes(block_hash: int) -> bytes:
    return (block_hash & HASH_MASK).to_bytes(8, "big")


def event_array(event: KVCacheEvent, block_size: int) -> list:
    if isinstance(event, BlockStored):
        parent = None if event.parent_block_hash is None else hash_bytes(event.parent_block_hash)
        tokens = [token for block in event.token_ids for token in block]
        lora_id = lora_name = None
        return ["BlockStored", [hash_bytes(h) for h in event.block_hashes], parent, tokens, block_size, lora_id,
                MEDIUM, lora_name]
    if isinstance(event, BlockRemoved):
        return ["BlockRemoved", [hash_bytes(h) for h in event.block_hashes], MEDIUM]
    return ["AllBlocksCleared"]


def encode_batch(timestamp: float, events: list[KVCacheEvent], block_size: int) -> bytes:
    """One ``EventBatch`` payload: what follows the topic and the sequence number in a published message."""
    batch = [timestamp, [event_array(event, block_size) for event in events], DATA_PARALLEL_RANK]
    return msgpack.packb(batch, use_bin_type=True)
