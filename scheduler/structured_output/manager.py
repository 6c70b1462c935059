"""Grammar masks in the engine step: one matcher per constrained sequence, masks filled while the forward runs.

The engine calls four hooks: ``start_filling`` (before the forward pass; the masks are computed in a worker thread
while it runs), ``apply`` (on the sampling logits, before the sampler), ``advance`` (with each sampled token:
accepted, completed (the choice ends) or rejected (the request fails)) and ``release`` (when a request ends). A matcher is kept in step
with its sequence's output tokens by count, so a preempted sequence that is recomputed (or any other replay) finds
its matcher where its tokens say it is.
"""
import enum
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from scheduler.faults import fires_at
from scheduler.sampling_params import InvalidParameterError, SamplingParams
from scheduler.sequence import Sequence
from scheduler.structured_output.backend import GrammarMatcher, apply_bitmask, bitmask_words
from scheduler.structured_output.compiler import GrammarCompiler
from scheduler.structured_output.spec import InvalidConstraintError

logger = logging.getLogger(__name__)

CONSTRAINT_PARAM = "response_format"


class GrammarOutcome(enum.Enum):
    ACCEPTED = "accepted"  # the token fits and the grammar goes on (an unconstrained sequence too)
    COMPLETED = "completed"  # the token completes the grammar: the choice ends
    REJECTED = "rejected"  # the grammar does not allow the token


@dataclass
class PendingMasks:
    rows: list[int]  # rows of the sampling logits that are constrained
    bitmask: torch.Tensor  # int32 [len(rows), words], row i for rows[i]
    done: Future


def check_constraint(compiler: GrammarCompiler, params: SamplingParams) -> None:
    """Compiles (or finds cached) the request's constraint; InvalidParameterError if it cannot be enforced."""
    if params.structured_output is None:
        return
    try:
        compiler.compile(params.structured_output)
    except InvalidConstraintError as error:
        raise InvalidParameterError(CONSTRAINT_PARAM, f"the constraint cannot be enforced: {error}") from None


class StructuredOutputManager:
    def __init__(self, compiler: GrammarCompiler, vocab_size: int) -> None:
        self.compiler = compiler
        self.words = bitmask_words(vocab_size)
        self._matchers: dict[int, GrammarMatcher] = {}  # seq_id -> matcher
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")

    def check(self, params: SamplingParams) -> None:
        check_constraint(self.compiler, params)

    def start_filling(self, seqs: list[Sequence]) -> PendingMasks | None:
        """Starts computing the masks of the constrained ones among ``seqs`` (the sampling rows, in order)."""
        rows = [row for row, seq in enumerate(seqs) if seq.params.structured_output is not None]
        if not rows:
            return None
        matchers = [self._synced_matcher(seqs[row]) for row in rows]
        bitmask = torch.zeros(len(rows), self.words, dtype=torch.int32)
        return PendingMasks(rows, bitmask, self._worker.submit(self.compiler.backend.fill_masks, matchers, bitmask))

    def apply(self, pending: PendingMasks | None, logits: torch.Tensor) -> None:
        """Masks the constrained rows of ``logits`` [B, V] in place (waits for the masks if still being filled)."""
        if pending is None:
            return
        pending.done.result()
        with torch.inference_mode():  # the executor's logits are inference tensors
            rows = torch.tensor(pending.rows, device=logits.device)
            constrained = logits[rows]  # [R, V]
            apply_bitmask(constrained, pending.bitmask)
            logits[rows] = constrained

    def advance(self, seq: Sequence, token_id: int) -> GrammarOutcome:
        """Feeds a sampled token (already appended to ``seq``) to its matcher."""
        matcher = self._matchers.get(seq.seq_id)
        if matcher is None:
            return GrammarOutcome.ACCEPTED
        if fires_at("GRAMMAR_REJECT_AT", seq.num_output_tokens) or not matcher.consume(token_id):
            return GrammarOutcome.REJECTED
        return GrammarOutcome.COMPLETED if matcher.is_finished() else GrammarOutcome.ACCEPTED

    def release(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self._matchers.pop(seq.seq_id, None)

    @property
    def num_active(self) -> int:
        return len(self._matchers)

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _synced_matcher(self, seq: Sequence) -> GrammarMatcher:
        matcher = self._matchers.get(seq.seq_id)
        if matcher is None:
            matcher = self.compiler.compile(seq.params.structured_output).new_matcher()
            self._matchers[seq.seq_id] = matcher
        num_output = seq.num_output_tokens
        if matcher.num_consumed > num_output:
            matcher.rollback(matcher.num_consumed - num_output)
        for token_id in seq.output_token_ids[matcher.num_consumed :]:
            matcher.consume(token_id)
        return matcher
