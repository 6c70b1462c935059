"""The seam between the engine and a grammar library: compile a constraint once, then one matcher per sequence.

A backend checks a ``StructuredOutputSpec`` cheaply (``validate``) and turns it into a ``CompiledGrammar``; each
sequence gets its own ``GrammarMatcher`` from it. Masks are bit masks (int32 words, bit ``t % 32`` of word ``t // 32``
allows token ``t``), the layout both llguidance and xgrammar use, so a second backend only has to implement these
three protocols.
"""
from typing import Protocol

import torch

from scheduler.structured_output.spec import StructuredOutputSpec


class GrammarMatcher(Protocol):
    """One sequence's position in its grammar."""

    @property
    def num_consumed(self) -> int:
        """Output tokens accepted so far."""

    def consume(self, token_id: int) -> bool:
        """Advances by one sampled token; False if the grammar rejects it."""

    def rollback(self, num_tokens: int) -> None:
        """Forgets the last ``num_tokens`` accepted tokens."""

    def is_finished(self) -> bool:
        """The grammar is complete and allows nothing more (EOS aside)."""


class CompiledGrammar(Protocol):
    def new_matcher(self) -> GrammarMatcher:
        """A matcher at the start of the grammar; cheap (the compiled grammar is shared)."""


class GrammarBackend(Protocol):
    name: str

    def validate(self, spec: StructuredOutputSpec) -> None:
        """Raises ``InvalidConstraintError`` if ``compile`` would: checks the grammar without building a matcher
        (the front end's cheap check before it sends a request)."""

    def compile(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        """Raises ``InvalidConstraintError`` naming what is wrong or unsupported. May take long: call it off the
        event loop."""

    def fill_masks(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """Writes the allowed next tokens of ``matchers[i]`` into row i of ``bitmask`` (int32 CPU [B, words])."""


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Sets the disallowed entries of ``logits`` [B, V] to -inf in place; ``bitmask``: int32 [B, ceil(V / 32)]."""
    num_rows, vocab_size = logits.shape
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)  # [32]
    words = bitmask.to(logits.device, non_blocking=True)  # [B, W]
    allowed = ((words.unsqueeze(-1) >> bits) & 1).reshape(num_rows, -1)[:, :vocab_size]  # [B, W * 32] -> [B, V]
    logits.masked_fill_(allowed == 0, float("-inf"))
