"""How rank 0 hands each step's batch to the tensor-parallel workers: two broadcasts of CPU int64 tensors.

A fixed-size header (command and sizes) goes first, then every batch tensor laid end to end in one payload, so
nothing is pickled per step and each worker rebuilds the ForwardBatch, host-side lengths included, without a
device sync.
"""
from enum import IntEnum

import torch
import torch.distributed as dist

from model.forward_batch import ForwardBatch

HEADER_SIZE = 5  # command, tokens, sequences, block table width, logits rows


class Command(IntEnum):
    STEP = 1
    SHUTDOWN = 2


def send_step(batch: ForwardBatch, group: dist.ProcessGroup) -> None:
    header, payload = pack_batch(batch)
    dist.broadcast(header, src=0, group=group)
    dist.broadcast(payload, src=0, group=group)


def send_shutdown(group: dist.ProcessGroup) -> None:
    header = torch.zeros(HEADER_SIZE, dtype=torch.int64)
    header[0] = Command.SHUTDOWN
    dist.broadcast(header, src=0, group=group)


def receive_step(group: dist.ProcessGroup) -> ForwardBatch | None:
    """The next batch rank 0 sends; None when rank 0 says to shut down."""
    header = torch.empty(HEADER_SIZE, dtype=torch.int64)
    dist.broadcast(header, src=0, group=group)
    command, num_tokens, num_seqs, width, num_logits = header.tolist()
    if command == Command.SHUTDOWN:
        return None
    if command != Command.STEP:
        raise ValueError(f"unknown tensor-parallel command {command} from rank 0")
    payload = torch.empty(_payload_size(num_tokens, num_seqs, width, num_logits), dtype=torch.int64)
    dist.broadcast(payload, src=0, group=group)
    return unpack_batch(payload, num_tokens, num_seqs, width, num_logits)


def pack_batch(batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(header [HEADER_SIZE], payload [N]) int64 CPU tensors describing ``batch``."""
    num_seqs, width = batch.block_tables.shape
    header = torch.tensor([Command.STEP, batch.num_tokens, num_seqs, width, batch.logits_indices.shape[0]],
                          dtype=torch.int64)
    parts = (batch.input_ids, batch.positions, batch.slot_mapping, batch.query_start_loc, batch.context_lens,
             batch.block_tables.flatten(), batch.logits_indices)
    payload = torch.cat([part.to("cpu", torch.int64) for part in parts])
    return header, payload


def unpack_batch(payload: torch.Tensor, num_tokens: int, num_seqs: int, width: int, num_logits: int) -> ForwardBatch:
    sizes = [num_tokens, num_tokens, num_tokens, num_seqs + 1, num_seqs, num_seqs * width, num_logits]
    input_ids, positions, slot_mapping, query_start_loc, context_lens, block_tables, logits_indices = (
        payload.split(sizes))
    return ForwardBatch(
        input_ids=input_ids,
        positions=positions,
        query_start_loc=query_start_loc.to(torch.int32),
        context_lens=context_lens.to(torch.int32),
        block_tables=block_tables.to(torch.int32).view(num_seqs, width),
        slot_mapping=slot_mapping,
        logits_indices=logits_indices,
        query_lens_cpu=query_start_loc.diff().tolist(),
        context_lens_cpu=context_lens.tolist(),
    )


def _payload_size(num_tokens: int, num_seqs: int, width: int, num_logits: int) -> int:
    return 3 * num_tokens + 2 * num_seqs + 1 + num_seqs * width + num_logits
