"""A step's batch tensors written into one preallocated host buffer and moved to the device with one copy.

The host buffer is pinned on CUDA, so the copy is asynchronous. Both buffers are allocated once with every part at
a fixed offset, so a CUDA graph captured over views of the device buffer finds each step's inputs at the same
addresses, whatever the batch size. The block table comes last and keeps its full width, so a step copies one
contiguous prefix: every part plus the table rows it uses. Table entries past a sequence's own blocks keep
whatever block ids earlier steps left there; nothing reads them beyond a sequence's context length.
"""
from dataclasses import dataclass

import torch

from model.forward_batch import ForwardBatch


@dataclass(frozen=True)
class BatchCapacity:
    max_tokens: int
    max_seqs: int
    table_width: int  # blocks per sequence at most: ceil(max_model_len / block_size)
    max_logits: int

    @property
    def nbytes(self) -> int:
        return 8 * (3 * self.max_tokens + self.max_logits + 1) + 4 * (2 * self.max_seqs + 1 + self.max_seqs *
                                                                  self.table_width)

    def holds(self, batch: ForwardBatch) -> bool:
        num_seqs, width = batch.block_tables.shape
        return (batch.num_tokens <= self.max_tokens and num_seqs <= self.max_seqs and width <= self.table_width
                and batch.logits_indices.shape[0] <= self.max_logits)


@dataclass
class BatchViews:
    """The parts of a batch as tensors over one buffer; every part at its capacity size."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    logits_indices: torch.Tensor  # [L] int64
    real_tokens: torch.Tensor  # [1] int64: tokens before a decode graph's padding rows (``ForwardBatch.real_tokens``)
    query_start_loc: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, W] int32

    @staticmethod
    def over(buffer: torch.Tensor, capacity: BatchCapacity) -> "BatchViews":
        """Views into the uint8 ``buffer`` of ``capacity.nbytes`` bytes."""
        t, b, w, n_logits = capacity.max_tokens, capacity.max_seqs, capacity.table_width, capacity.max_logits
        int64_bytes = 8 * (3 * t + n_logits + 1)
        int64s = buffer[:int64_bytes].view(torch.int64)
        int32s = buffer[int64_bytes:capacity.nbytes].view(torch.int32)
        input_ids, positions, slot_mapping, logits_indices, real_tokens = int64s.split([t, t, t, n_logits, 1])
        query_start_loc, context_lens, tables = int32s.split([b + 1, b, b * w])
        return BatchViews(input_ids, positions, slot_mapping, logits_indices, real_tokens, query_start_loc,
                          context_lens, tables.view(b, w))

    def write(self, batch: ForwardBatch) -> None:
        """Writes ``batch`` into the leading entries (rows, columns) of every part."""
        t, b = batch.num_tokens, batch.num_seqs
        self.input_ids[:t].copy_(batch.input_ids)
        self.positions[:t].copy_(batch.positions)
        self.slot_mapping[:t].copy_(batch.slot_mapping)
        self.logits_indices[:batch.logits_indices.shape[0]].copy_(batch.logits_indices)
        self.query_start_loc[:b + 1].copy_(batch.query_start_loc)
        self.context_lens[:b].copy_(batch.context_lens)
        self.block_tables[:b, :batch.block_tables.shape[1]].copy_(batch.block_tables)

    def batch(self, num_tokens: int, num_seqs: int, num_logits: int, query_lens_cpu: list[int],
              context_lens_cpu: list[int], padded: bool = False) -> ForwardBatch:
        """A ForwardBatch over the leading entries; its block table has the full width. A ``padded`` one has its
        real token count in ``real_tokens``."""
        return ForwardBatch(
            input_ids=self.input_ids[:num_tokens], positions=self.positions[:num_tokens],
            query_start_loc=self.query_start_loc[:num_seqs + 1], context_lens=self.context_lens[:num_seqs],
            block_tables=self.block_tables[:num_seqs], slot_mapping=self.slot_mapping[:num_tokens],
            logits_indices=self.logits_indices[:num_logits], query_lens_cpu=query_lens_cpu,
            context_lens_cpu=context_lens_cpu, real_tokens=self.real_tokens if padded else None,
        )


class StepInputs:
    """One host buffer (pinned on CUDA) and one device buffer, laid out for ``capacity``."""

    def __init__(self, capacity: BatchCapacity, device: torch.device) -> None:
        self.capacity = capacity
        self.device = device
        self._host_buffer = torch.zeros(capacity.nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self._device_buffer = torch.zeros(capacity.nbytes, dtype=torch.uint8, device=device)
        self._host = BatchViews.over(self._host_buffer, capacity)
        self.on_device = BatchViews.over(self._device_buffer, capacity)
        self._table_offset = capacity.nbytes - 4 * capacity.max_seqs * capacity.table_width
        self._copied = torch.cuda.Event() if device.type == "cuda" else None  # the last copy left the host buffer
        self._copy_pending = False

    def host(self) -> BatchViews:
        """The host views to write a step into, once the previous step's copy has left them."""
        if self._copy_pending:
            self._copied.synchronize()
            self._copy_pending = False
        return self._host

    def copy_to_device(self, num_seqs: int) -> None:
        """The one host-to-device copy of a step: every part, and the first ``num_seqs`` table rows."""
        end = self._table_offset + 4 * num_seqs * self.capacity.table_width
        self._device_buffer[:end].copy_(self._host_buffer[:end], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
            self._copy_pending = True

    def load(self, batch: ForwardBatch) -> ForwardBatch:
        """``batch`` on the device, through the buffers (``capacity.holds(batch)`` must be true)."""
        self.host().write(batch)
        self.copy_to_device(batch.num_seqs)
        return self.on_device.batch(batch.num_tokens, batch.num_seqs, int(batch.logits_indices.shape[0]),
                                    batch.query_lens_cpu, batch.context_lens_cpu)
