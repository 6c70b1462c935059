"""The sampling parameters and penalty state of every running sequence, in preallocated per-slot device tensors.

A sequence takes a slot the first time it samples and gives it back when it finishes or is preempted; the slot's
rows are written then, and only then (a few scalar fills, its prompt's tokens for the repetition penalty, and its
output so far: a preempted sequence's counts are rebuilt from its token ids when it samples again). A step reads the
rows of its sequences by slot index, so nothing per request is rebuilt or copied to the device per step.

Shapes (S = max_num_seqs, V = vocabulary): ``output_counts`` [S, V] float32 (occurrences of each output token),
``prompt_seen`` [S, V] bool (tokens of the prompt), and [S] vectors of the per-request parameters.
"""
import torch

from scheduler.sampling_state import SamplingState


# Per slot: temperature, top_p, min_p and three penalties (float32), top_k (int64), greedy (bool).
SLOT_VECTOR_BYTES = 6 * 4 + 8 + 1


def sampling_batch_bytes(max_num_seqs: int, vocab_size: int) -> int:
    """Device memory of the per-slot state: counts (4 bytes) and prompt mask (1 byte) per token, and the vectors."""
    return max_num_seqs * (vocab_size * 5 + SLOT_VECTOR_BYTES)


class SamplingBatch:
    def __init__(self, max_num_seqs: int, vocab_size: int, device: torch.device) -> None:
        self.max_num_seqs = max_num_seqs
        self.device = device
        slots, vocab = max_num_seqs, vocab_size
        self.temperature = torch.ones(slots, dtype=torch.float32, device=device)  # 1.0 for greedy rows (unused)
        self.greedy = torch.zeros(slots, dtype=torch.bool, device=device)
        self.top_k = torch.full((slots,), vocab, dtype=torch.int64, device=device)
        self.top_p = torch.ones(slots, dtype=torch.float32, device=device)
        self.min_p = torch.zeros(slots, dtype=torch.float32, device=device)
        self.repetition_penalty = torch.ones(slots, dtype=torch.float32, device=device)
        self.frequency_penalty = torch.zeros(slots, dtype=torch.float32, device=device)
        self.presence_penalty = torch.zeros(slots, dtype=torch.float32, device=device)
        self.output_counts = torch.zeros(slots, vocab, dtype=torch.float32, device=device)
        self.prompt_seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out the lowest slot first

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def join(self, state: SamplingState, prompt_token_ids: list[int], output_token_ids: list[int]) -> int:
        """Gives ``state`` a slot and writes its rows; the slot."""
        if not self._free:
            raise RuntimeError(f"every one of the {self.max_num_seqs} sampling slots is taken")
        slot = self._free.pop()
        params = state.params
        self.temperature[slot] = 1.0 if state.greedy else params.temperature
        self.greedy[slot] = state.greedy
        self.top_k[slot] = state.top_k
        self.top_p[slot] = params.top_p
        self.min_p[slot] = params.min_p
        self.repetition_penalty[slot] = params.repetition_penalty
        self.frequency_penalty[slot] = params.frequency_penalty
        self.presence_penalty[slot] = params.presence_penalty
        if state.uses_penalties:
            counts = self.output_counts[slot]
            counts.zero_()
            if output_token_ids:
                ids = torch.tensor(output_token_ids, dtype=torch.int64, device=self.device)
                counts.index_add_(0, ids, torch.ones(len(output_token_ids), device=self.device))
            if params.repetition_penalty != 1.0:
                seen = self.prompt_seen[slot]
                seen.zero_()
                seen[torch.tensor(prompt_token_ids, dtype=torch.int64, device=self.device)] = True
        state.slot = slot
        return slot

    def leave(self, state: SamplingState) -> None:
        """Frees the slot of ``state``, if it has one (its rows are rewritten by the next sequence to join)."""
        if state.slot is not None:
            self._free.append(state.slot)
            state.slot = None
