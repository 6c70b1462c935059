"""The attention seam: a backend, chosen once at load (``model.backend_selection``), that builds per-forward
metadata and stores + attends.

``torch`` is the reference and CPU path (``model.paged_attention``). ``triton`` runs the paged kernels of
``model.kernels.attention``; its metadata is made only of the batch's device tensors and host-known ints (tensor
shapes and a max-query-length bound), so nothing in its forward reads a device value back and a pure-decode forward
can be captured in a CUDA graph. Padded rows (slot -1, context length 0) write nothing and attend to nothing.
"""
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from model.forward_batch import ForwardBatch
from model.paged_attention import AttentionMetadata, paged_attention, store_kv


class AttentionLayer(Protocol):
    """What a backend needs to know about one attention layer."""

    scale: float
    window: int | None  # sliding window in tokens, None for full attention
    k_scale: float  # FP8 KV cache scales: the cache stores x / scale
    v_scale: float


class AttentionBackend(Protocol):
    name: str
    graph_safe: bool  # its forward reads no device value back, so a CUDA graph can capture it

    def build_metadata(self, batch: ForwardBatch, block_size: int) -> Any: ...

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor, metadata: Any) -> torch.Tensor: ...


@dataclass
class AttentionStep:
    """One forward's attention, shared by every layer: the backend and the metadata it built for the batch."""

    backend: AttentionBackend
    metadata: Any

    @classmethod
    def prepare(cls, backend: AttentionBackend, batch: ForwardBatch, block_size: int) -> "AttentionStep":
        return cls(backend, backend.build_metadata(batch, block_size))

    def __call__(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
        """Writes key/value [T, Hkv, D] into the layer's cache, returns attention of query [T, Hq, D] over it."""
        return self.backend.forward(layer, query, key, value, key_cache, value_cache, self.metadata)


class TorchAttentionBackend:
    name = "torch"
    graph_safe = False

    def build_metadata(self, batch: ForwardBatch, block_size: int) -> AttentionMetadata:
        return AttentionMetadata.build(batch, block_size)

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        store_kv(key, value, key_cache, value_cache, metadata.slot_mapping, layer.k_scale, layer.v_scale)
        return paged_attention(query, key, value, key_cache, value_cache, metadata, layer.scale, layer.window,
                               layer.k_scale, layer.v_scale)


@dataclass
class TritonAttentionMetadata:
    query_start_loc: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32; 0 for a padded row
    block_tables: torch.Tensor  # [B, W] int32
    slot_mapping: torch.Tensor  # [T] int64; -1 for a padded row
    max_query_len: int  # host-known bound; 1 means a pure-decode batch
    _partials: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    def decode_partials(self, num_heads: int, num_splits: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Split-KV scratch ([B, Hq, S, D], [B, Hq, S]) fp32, shared by the layers of this forward."""
        key = (num_heads, num_splits, head_dim)
        if key not in self._partials:
            num_seqs, device = self.context_lens.shape[0], self.context_lens.device
            self._partials[key] = (
                torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=device),
                torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=device),
            )
        return self._partials[key]


class TritonAttentionBackend:
    name = "triton"
    graph_safe = True

    def __init__(self) -> None:
        # Imported here: Triton is only needed when this backend is chosen.
        from model.kernels.attention import decode_reduce, decode_split_kv, store_kv, varlen_attention

        self._store = store_kv
        self._split = decode_split_kv
        self._reduce = decode_reduce
        self._varlen = varlen_attention

    def build_metadata(self, batch: ForwardBatch, block_size: int) -> TritonAttentionMetadata:
        return TritonAttentionMetadata(
            query_start_loc=batch.query_start_loc,
            context_lens=batch.context_lens,
            block_tables=batch.block_tables,
            slot_mapping=batch.slot_mapping,
            max_query_len=max(batch.query_lens_cpu, default=1),
        )

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor, metadata: TritonAttentionMetadata
                ) -> torch.Tensor:
        self._store.store_kv(key, value, key_cache, value_cache, metadata.slot_mapping, layer.k_scale, layer.v_scale)
        output = torch.empty_like(query)  # [T, Hq, D]
        if metadata.is_decode_only:
            num_seqs, num_heads, head_dim = query.shape
            max_context = metadata.block_tables.shape[1] * key_cache.shape[1]
            num_splits, split_tokens = self._split.plan_splits(num_seqs, num_heads, max_context)
            partial_out, partial_lse = metadata.decode_partials(num_heads, num_splits, head_dim)
            self._split.decode_split_kv(query, key_cache, value_cache, metadata.block_tables, metadata.context_lens,
                                        output, partial_out, partial_lse, split_tokens, layer.scale, layer.window,
                                        layer.k_scale, layer.v_scale)
            if num_splits > 1:
                self._reduce.decode_reduce(partial_out, partial_lse, output)
        else:
            self._varlen.varlen_attention(query, key_cache, value_cache, metadata.block_tables,
                                          metadata.query_start_loc, metadata.context_lens, output,
                                          metadata.max_query_len, layer.scale, layer.window, layer.k_scale,
                                          layer.v_scale)
        return output
