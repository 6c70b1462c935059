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
    block_tables: torch.Tensor  # [B, W] int32, the sequence's KV blocks in order; entries past them hold any
    #   valid block id (0 from ``build``) and are never read
    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset where each new token's K/V is written
    logits_indices: torch.Tensor  # [L] int64, flat token indices whose logits are returned, in this order
    # Host-side copies, so the CPU attention path and the scheduler never sync on a device tensor. In a batch
    # captured for graph replay, context_lens_cpu holds the bound max_model_len for every row: the real lengths
    # change from replay to replay and live only in context_lens.
    query_lens_cpu: list[int]
    context_lens_cpu: list[int]
    # [1] int64 beside the other tensors: how many leading tokens are real when a captured graph's batch is padded
    # past them (the count changes from replay to replay, so it stays on the device). None: every token is real.
    real_tokens: torch.Tensor | None = None

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
            real_tokens=None if self.real_tokens is None else self.real_tokens.to(device, non_blocking=True),
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

        By default logits are requested for the last new token of each sequence. Positions and slots come from a
        few tensor ops over the whole batch, not a Python loop over its tokens.
        """
        query_lens = [len(tokens) for tokens in token_ids]
        if not len(query_lens) == len(num_cached) == len(block_tables):
            raise ValueError("token_ids, num_cached and block_tables must have one entry per sequence")
        context_lens = [cached + query_len for cached, query_len in zip(num_cached, query_lens)]
        if any(context_len > len(table) * block_size for context_len, table in zip(context_lens, block_tables)):
            raise ValueError("a sequence's block table does not cover its context")
        width = max((len(t) for t in block_tables), default=0)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        tables = tables.reshape(len(block_tables), width)  # [B, W]
        lens = torch.tensor(query_lens, dtype=torch.int64)  # [B]
        starts = torch.zeros(len(query_lens) + 1, dtype=torch.int64)
        torch.cumsum(lens, 0, out=starts[1:])  # [B + 1]
        seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens)), lens)  # [T]
        positions = (torch.arange(int(starts[-1])) - starts[seq_of_token]
                     + torch.tensor(num_cached, dtype=torch.int64)[seq_of_token])  # [T]
        blocks = tables[seq_of_token, positions // block_size].long()  # [T]
        if logits_indices is None:
            logits = starts[1:] - 1
        else:
            logits = torch.tensor(logits_indices, dtype=torch.int64)
        return ForwardBatch(
            input_ids=torch.tensor([token for tokens in token_ids for token in tokens], dtype=torch.int64),
            positions=positions,
            query_start_loc=starts.to(torch.int32),
            context_lens=torch.tensor(context_lens, dtype=torch.int32),
            block_tables=tables,
            slot_mapping=blocks * block_size + positions % block_size,
            logits_indices=logits,
            query_lens_cpu=query_lens,
            context_lens_cpu=context_lens,
        )
