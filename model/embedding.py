"""Token embedding and LM head with the vocabulary split across tensor-parallel ranks."""
import torch
import torch.nn.functional as F
from torch import nn

from model.linear import linear, pack_weight
from model.parallel import ParallelState
from model.weights import CheckpointTensor, WeightTarget


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous range of vocabulary rows (the last range zero-padded to equal size)."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelState, dtype: torch.dtype,
                 shared_weight: nn.Parameter | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.parallel = parallel
        self.rows_per_rank = -(-vocab_size // parallel.world_size)
        self.vocab_start = parallel.rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, vocab_size)
        self.weight = shared_weight if shared_weight is not None else nn.Parameter(
            torch.empty(self.rows_per_rank, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.parallel.is_parallel:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = torch.where(outside, 0, input_ids - self.vocab_start)
        hidden = F.embedding(local_ids, self.weight).masked_fill(outside[:, None], 0)
        return self.parallel.all_reduce(hidden)

    def weight_loader(self, source: CheckpointTensor) -> None:
        rows = self.vocab_end - self.vocab_start
        self.weight.data[:rows].copy_(source.read(slice(self.vocab_start, self.vocab_end)))
        self.weight.data[rows:].zero_()

    def weight_targets(self, key: str) -> dict[str, WeightTarget]:
        return {key: WeightTarget((self.vocab_size, self.hidden_size), self.weight_loader, (key,))}


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to float32 logits over the full vocabulary (gathered from every rank's range).

    With ``tied_to`` it reuses the embedding's weight (``tie_word_embeddings``).
    """

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelState, dtype: torch.dtype,
                 tied_to: VocabParallelEmbedding | None = None) -> None:
        super().__init__(vocab_size, hidden_size, parallel, dtype,
                         shared_weight=tied_to.weight if tied_to is not None else None)
        self.tied = tied_to is not None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight)  # [N, rows_per_rank]
        logits = self.parallel.all_gather(logits, dim=-1)[:, :self.vocab_size]
        return logits.float()

    def pack_weights(self) -> None:
        self.weight = pack_weight(self.weight)  # a tied embedding keeps its own plain weight

    def weight_targets(self, key: str) -> dict[str, WeightTarget]:
        if self.tied:
            # A tied checkpoint may still carry a copy of the embedding under this key; it is redundant.
            return {key: WeightTarget((self.vocab_size, self.hidden_size), None, ())}
        return super().weight_targets(key)
