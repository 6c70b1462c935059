"""Attention over a paged KV cache: the kernel boundary a faster GPU kernel can replace.

``store_kv`` writes the step's keys/values into their slots and ``paged_attention`` attends each sequence's new
tokens over its whole history. Everything here runs on plain torch ops on any device: decodes of all sequences
are gathered into one masked SDPA call; prefill chunks run one SDPA call each, causal on the fresh keys when there
is no cached prefix and with an explicit mask over the gathered history when there is one. Index tensors and masks
are built once per forward in ``AttentionMetadata`` from host-side lengths, so no layer syncs with the device.
An FP8 cache is dequantized (``stored * scale``) as its blocks are gathered; prefills then always read their keys
back from the cache, so every token attends over exactly what later steps will read.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.forward_batch import ForwardBatch
from model.kv_cache import is_fp8, quantize_kv

# Gathered keys per decode attention call on the CPU (values take as much again).
_CPU_DECODE_CHUNK_BYTES = 3 * 2**20


@dataclass
class PrefillChunk:
    token_start: int
    token_end: int
    context_len: int  # keys it attends over: cached prefix plus its new tokens
    block_ids: torch.Tensor  # [n_blocks] int64, the blocks holding those keys, in order

    @property
    def query_len(self) -> int:
        return self.token_end - self.token_start

    @property
    def has_prefix(self) -> bool:
        return self.context_len > self.query_len


@dataclass
class DecodeGroup:
    token_index: torch.Tensor | None  # [B] flat token indices of the decodes; None when they are all tokens in order
    block_tables: torch.Tensor  # [B, n_blocks] int64
    context_lens: torch.Tensor  # [B] int64
    num_keys: int  # n_blocks * block_size, the gathered history length


@dataclass
class AttentionMetadata:
    decode: DecodeGroup | None
    prefills: list[PrefillChunk]
    slot_mapping: torch.Tensor  # [T] int64, where each new token's K/V goes
    _masks: dict[tuple[str, int, int | None], torch.Tensor] = field(default_factory=dict)
    _buffers: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, batch: ForwardBatch, block_size: int) -> "AttentionMetadata":
        device = batch.input_ids.device
        starts = [0]
        for query_len in batch.query_lens_cpu:
            starts.append(starts[-1] + query_len)
        decode_seqs = [i for i, q in enumerate(batch.query_lens_cpu) if q == 1]
        prefills = []
        for i, (query_len, context_len) in enumerate(zip(batch.query_lens_cpu, batch.context_lens_cpu)):
            if query_len > 1:
                n_blocks = -(-context_len // block_size)
                prefills.append(PrefillChunk(starts[i], starts[i + 1], context_len,
                                             batch.block_tables[i, :n_blocks].long()))
        decode = None
        if decode_seqs:
            n_blocks = -(-max(batch.context_lens_cpu[i] for i in decode_seqs) // block_size)
            if len(decode_seqs) == batch.num_seqs:
                token_index, tables, lens = None, batch.block_tables[:, :n_blocks], batch.context_lens
            else:
                seq_index = torch.tensor(decode_seqs, dtype=torch.int64, device=device)
                token_index = torch.tensor([starts[i] for i in decode_seqs], dtype=torch.int64, device=device)
                tables = batch.block_tables[seq_index, :n_blocks]
                lens = batch.context_lens[seq_index]
            decode = DecodeGroup(token_index, tables.long(), lens.long(), n_blocks * block_size)
        return cls(decode, prefills, batch.slot_mapping)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, 1, num_keys] bool: which gathered keys each decode token sees."""
        key = ("decode", 0, window)
        if key not in self._masks:
            group = self.decode
            positions = torch.arange(group.num_keys, device=group.context_lens.device)[None, :]  # [1, L]
            lens = group.context_lens[:, None]  # [B, 1]
            visible = positions < lens
            if window is not None:
                visible &= positions >= lens - window
            self._masks[key] = visible[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor:
        """[q_len, context_len] bool: causal (and windowed) visibility of a chunk's queries over its history."""
        key = ("prefill", index, window)
        if key not in self._masks:
            chunk = self.prefills[index]
            device = chunk.block_ids.device
            query_positions = torch.arange(chunk.context_len - chunk.query_len, chunk.context_len, device=device)
            key_positions = torch.arange(chunk.context_len, device=device)
            visible = key_positions[None, :] <= query_positions[:, None]
            if window is not None:
                visible &= key_positions[None, :] > query_positions[:, None] - window
            self._masks[key] = visible
        return self._masks[key]

    def scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A buffer every layer of this forward reuses: fresh multi-megabyte tensors cost page faults on the CPU."""
        key = (name, shape, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return self._buffers[key]

    def gather_blocks(self, name: str, cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype,
                      scale: float = 1.0) -> torch.Tensor:
        """cache[block_ids] [n, block_size, Hkv, D] as ``dtype`` (an FP8 cache times ``scale``), in reused buffers."""
        shape = (block_ids.numel(), *cache.shape[1:])
        gathered = torch.index_select(cache, 0, block_ids, out=self.scratch(name, shape, cache.dtype, cache.device))
        if dtype == cache.dtype:
            return gathered
        converted = self.scratch(name, shape, dtype, cache.device).copy_(gathered)
        return converted.mul_(scale) if is_fp8(cache) and scale != 1.0 else converted


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """key, value [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at flat slots [T]."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    if is_fp8(key_cache):
        # index_copy_ has no float8 kernel on the CPU; the bytes are what matter.
        key, value = quantize_kv(key, k_scale).view(torch.uint8), quantize_kv(value, v_scale).view(torch.uint8)
        key_cache, value_cache = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                    value_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                    window: int | None, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """query [T, Hq, D], this step's key/value [T, Hkv, D] (already stored) -> attention output [T, Hq, D]."""
    decode = metadata.decode
    kv_scales = (k_scale, v_scale)
    if decode is not None and decode.token_index is None:
        return _decode_attention(query, key_cache, value_cache, metadata, scale, window, kv_scales)
    output = torch.empty_like(query)
    if decode is not None:
        decoded = _decode_attention(query.index_select(0, decode.token_index), key_cache, value_cache, metadata,
                                    scale, window, kv_scales)
        output.index_copy_(0, decode.token_index, decoded)
    for index, chunk in enumerate(metadata.prefills):
        rows = slice(chunk.token_start, chunk.token_end)
        output[rows] = _prefill_attention(query[rows], key[rows], value[rows], key_cache, value_cache, metadata,
                                          index, scale, window, kv_scales)
    return output


def _decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      metadata: AttentionMetadata, scale: float, window: int | None,
                      kv_scales: tuple[float, float]) -> torch.Tensor:
    group = metadata.decode
    batch, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    seqs_per_chunk = batch
    compute_dtype = query.dtype
    if query.device.type == "cpu":
        # PyTorch's CPU SDPA kernel is ~8x slower on bfloat16 than on float32 for single-query attention. And the
        # gathered history is attended in chunks of sequences small enough to still be in the CPU cache when SDPA
        # reads it: 1.6x faster at 144 keys per sequence, 2.8x at 512 (measured, batch 16).
        compute_dtype = torch.float32
        seq_bytes = group.num_keys * num_kv_heads * head_dim * compute_dtype.itemsize
        seqs_per_chunk = max(1, _CPU_DECODE_CHUNK_BYTES // seq_bytes)
    grouped_query = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, Hkv, G, D]
    mask = metadata.decode_mask(window)  # [B, 1, 1, L]
    out = torch.empty(batch, num_kv_heads, num_heads // num_kv_heads, head_dim, dtype=compute_dtype,
                      device=query.device)
    for start in range(0, batch, seqs_per_chunk):
        seqs = slice(start, min(start + seqs_per_chunk, batch))
        blocks = group.block_tables[seqs].reshape(-1)
        keys = metadata.gather_blocks("decode_keys", key_cache, blocks, compute_dtype,
                                      kv_scales[0])  # [b * n_blocks, bs, Hkv, D]
        values = metadata.gather_blocks("decode_values", value_cache, blocks, compute_dtype, kv_scales[1])
        chunk = seqs.stop - seqs.start
        keys = keys.view(chunk, group.num_keys, num_kv_heads, head_dim).transpose(1, 2)  # [b, Hkv, L, D]
        values = values.view(chunk, group.num_keys, num_kv_heads, head_dim).transpose(1, 2)
        # Each kv head's query group rides in the "query length" dimension: no repeated keys for GQA.
        out[seqs] = F.scaled_dot_product_attention(grouped_query[seqs].to(compute_dtype), keys, values,
                                                   attn_mask=mask[seqs], scale=scale)  # [b, Hkv, G, D]
    return out.view(batch, num_heads, head_dim).to(query.dtype)


def _prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, metadata: AttentionMetadata, index: int, scale: float,
                       window: int | None, kv_scales: tuple[float, float]) -> torch.Tensor:
    chunk = metadata.prefills[index]
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    from_cache = chunk.has_prefix or is_fp8(key_cache)
    if from_cache:
        head_dim = key.shape[2]
        keys = metadata.gather_blocks("prefill_keys", key_cache, chunk.block_ids, query.dtype, kv_scales[0])
        values = metadata.gather_blocks("prefill_values", value_cache, chunk.block_ids, query.dtype, kv_scales[1])
        key = keys.view(-1, num_kv_heads, head_dim)[:chunk.context_len]
        value = values.view(-1, num_kv_heads, head_dim)[:chunk.context_len]
    causal_only = not from_cache and window is None
    mask = None if causal_only else metadata.prefill_mask(index, window)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None],
        attn_mask=mask, is_causal=causal_only, scale=scale, enable_gqa=num_heads != num_kv_heads,
    )  # [1, Hq, q_len, D]
    return out[0].transpose(0, 1)
