"""The flat, unpadded batch the model runs: prefill chunks and decodes of many sequences in one forward."""
from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """One engine step's tokens, laid end to end (no padding).

    Sequence ``i`` owns the flat tokens ``query_start_loc[i]:query_start_loc[i + 1]``. Those are its *new* tokens;
    before them it already has ``context_lens[i] - query_lens[i]`` tokens in the KV cache (a cached prefix or earlier
    chunks). After the forward, the KV cache holds all ``context_lens[i]`` tokens of it.
    """

    input_ids: torch.Tensor  # [T] int64, the new tokens of every sequence, concatenated
    positions: torch.Tensor  # [T] int64, each token's position in its own sequence
    query_start_loc: torch.Tensor  # [B + 1] int32, cumulative offsets of each sequence's new tokens
    context_lens: torch.Tensor  # [B] int32, tokens in the sequence's context once this step's tokens are written
    block_tables: torch.Tensor  # [B, max_blocks] int32, the sequence's KV blocks in order; unused entries are 0
    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset where each new token's K/V is written
    logits_indices: torch.Tensor  # [L] int64, flat token indices whose logits are returned, in this order
    # Host-side copies, so the CPU attention path and the scheduler never sync on a device tensor.
    query_lens_cpu: list[int]
    context_lens_cpu: list[int]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens_cpu)

    def to(self, device: torch.device | str) -> "ForwardBatch":
        return ForwardBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            positions=self.positions.to(device, non_blocking=True),
            query_start_loc=self.query_start_loc.to(device, non_blocking=True),
            context_lens=self.context_lens.to(device, non_blocking=True),
            block_tables=self.block_tables.to(device, non_blocking=True),
            slot_mapping=self.slot_mapping.to(device, non_blocking=True),
            logits_indices=self.logits_indices.to(device, non_blocking=True),
            query_lens_cpu=self.query_lens_cpu,
            context_lens_cpu=self.context_lens_cpu,
        )

    @staticmethod
    def build(
        token_ids: list[list[int]],
        num_cached: list[int],
        block_tables: list[list[int]],
        block_size: int,
        logits_indices: list[int] | None = None,
    ) -> "ForwardBatch":
        """Builds a batch from per-sequence new tokens, cached-prefix lengths and block tables.

        By default logits are requested for the last new token of each sequence.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        context_lens: list[int] = []
        for tokens, cached, table in zip(token_ids, num_cached, block_tables, strict=True):
            for offset, token in enumerate(tokens):
                pos = cached + offset
                input_ids.append(token)
                positions.append(pos)
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            starts.append(starts[-1] + len(tokens))
            context_lens.append(cached + len(tokens))
        if logits_indices is None:
            logits_indices = [end - 1 for end in starts[1:]]
        width = max((len(t) for t in block_tables), default=0)
        padded_tables = [t + [0] * (width - len(t)) for t in block_tables]
        return ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            context_lens=torch.tensor(context_lens, dtype=torch.int32),
            block_tables=torch.tensor(padded_tables, dtype=torch.int32).reshape(len(block_tables), width),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64),
            query_lens_cpu=[len(t) for t in token_ids],
            context_lens_cpu=context_lens,
        )
