"""Token embedding and LM head with the vocabulary split across tensor-parallel ranks.

On the CPU either may hold packed integer rows instead (``use_quantized``, from a GGUF file): the embedding then
dequantizes only the rows it looks up, and the head multiplies with the quantized-matmul kernel.
"""
import torch
import torch.nn.functional as F
from torch import nn

from model.kernels.cpu.qlinear import qlinear
from model.linear import linear, pack_weight
from model.parallel import ParallelState
from model.quant.packed import PackedQuantWeight, dequantize_rows, nbytes
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
        self.quant: PackedQuantWeight | None = None
        self.quant_type = ""

    def use_quantized(self, weight: PackedQuantWeight, type_name: str) -> None:
        """Keeps the [vocab, hidden] table as packed rows (single rank); the float weight is dropped."""
        self.quant, self.quant_type = weight, type_name
        self.weight = nn.Parameter(torch.empty(0, self.hidden_size, dtype=self.weight.dtype), requires_grad=False)

    def quantized_bytes_by_type(self) -> dict[str, int]:
        return {} if self.quant is None else {self.quant_type: nbytes(self.quant)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return dequantize_rows(self.quant, input_ids).to(self.weight.dtype)
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
        self.tied_embedding = (tied_to,) if tied_to is not None else ()  # a tuple: not a second submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        quant = self.tied_embedding[0].quant if self.tied else self.quant
        if quant is not None:
            return qlinear(hidden, quant)  # [N, vocab] float32
        logits = linear(hidden, self.weight)  # [N, rows_per_rank]
        logits = self.parallel.all_gather(logits, dim=-1)[:, :self.vocab_size]
        return logits.float()

    def quantized_bytes_by_type(self) -> dict[str, int]:
        return {} if self.tied else super().quantized_bytes_by_type()

    def pack_weights(self) -> None:
        if self.quant is not None or (self.tied and self.tied_embedding[0].quant is not None):
            return
        self.weight = pack_weight(self.weight)  # a tied embedding keeps its own plain weight

    def weight_targets(self, key: str) -> dict[str, WeightTarget]:
        if self.tied:
            # A tied checkpoint may still carry a copy of the embedding under this key; it is redundant.
            return {key: WeightTarget((self.vocab_size, self.hidden_size), None, ())}
        return super().weight_targets(key)
