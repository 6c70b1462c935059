"""Grammars in the engine: compiled off the step, then one matcher per constrained sequence, masks filled while the
forward runs.

A request joins with ``add``: its grammar compiles on the compiler's workers while its sequences wait
(``Sequence.grammar_pending``: the scheduler does not admit them, so they hold no KV blocks); each step begins with
``take_compiled``, which readies the requests whose grammar is done and returns those whose compilation failed.
Then four hooks: ``start_filling`` (before the forward pass; the masks are computed in a worker thread while it runs),
``apply`` (on the sampling logits, before the sampler), ``advance`` (with each sampled token: accepted, completed
(the choice ends) or rejected (the request fails)) and ``release`` (when a request ends). A matcher is kept in step
with its sequence's output tokens by count, so a preempted sequence that is recomputed (or any other replay) finds
its matcher where its tokens say it is.
"""
import enum
import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from scheduler.faults import fires_at
from scheduler.sequence import Sequence
from scheduler.structured_output.backend import CompiledGrammar, GrammarMatcher, apply_bitmask, bitmask_words
from scheduler.structured_output.compiler import GrammarCompiler, compile_error
from scheduler.structured_output.spec import InvalidConstraintError, unenforceable

logger = logging.getLogger(__name__)


class GrammarOutcome(enum.Enum):
    ACCEPTED = "accepted"  # the token fits and the grammar goes on (an unconstrained sequence too)
    COMPLETED = "completed"  # the token completes the grammar: the choice ends
    REJECTED = "rejected"  # the grammar does not allow the token


@dataclass
class PendingMasks:
    """A step's masks in one host buffer: the bitmask (row i for ``rows[i]``), then the row indices."""

    rows: list[int]  # rows of the sampling logits that are constrained
    packed: torch.Tensor  # int32 [len(rows) * words + len(rows)]
    done: Future

    @property
    def bitmask(self) -> torch.Tensor:
        """int32 [len(rows), words]: a view of ``packed``."""
        num_rows = len(self.rows)
        return self.packed[: self.packed.shape[0] - num_rows].view(num_rows, -1)


class StructuredOutputManager:
    def __init__(self, compiler: GrammarCompiler, vocab_size: int, max_rows: int = 256,
                 device: torch.device = torch.device("cpu")) -> None:
        """``max_rows``: sampling rows of a step at most (max_num_seqs). On CUDA the masks' host buffer is pinned,
        so a step's masks and row indices reach the device in one non-blocking copy."""
        self.compiler = compiler
        self.words = bitmask_words(vocab_size)
        self._host = torch.zeros(max_rows * (self.words + 1), dtype=torch.int32, pin_memory=device.type == "cuda")
        self._matchers: dict[int, GrammarMatcher] = {}  # seq_id -> matcher
        self._compiling: dict[str, tuple[Future[CompiledGrammar], list[Sequence]]] = {}  # by request id
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")

    def add(self, seqs: list[Sequence]) -> None:
        """Starts the compilation of a new request's grammar (its choices ``seqs`` share it), or finds it cached.
        Raises ``InvalidConstraintError`` if it is known to fail; until it is ready the sequences wait."""
        spec = seqs[0].params.structured_output
        if spec is None:
            return
        future = self.compiler.submit(spec)
        if not future.done():
            for seq in seqs:
                seq.grammar_pending = True
            self._compiling[seqs[0].request_id] = (future, seqs)
            return
        error = compile_error(future)
        if error is not None:
            raise InvalidConstraintError(unenforceable(error))
        self._start_matchers(future.result(), seqs)

    def take_compiled(self) -> list[tuple[str, str]]:
        """Readies the waiting requests whose grammar is compiled; returns (request id, error) of those whose
        compilation failed (they are forgotten here: the caller ends them)."""
        failed = []
        for request_id, (future, seqs) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            error = compile_error(future)
            if error is not None:
                failed.append((request_id, unenforceable(error)))
                continue
            self._start_matchers(future.result(), seqs)
            for seq in seqs:
                seq.grammar_pending = False
        return failed

    def wait_for_compiles(self, timeout_s: float) -> None:
        """Blocks until a waiting request's grammar is compiled, at most ``timeout_s`` (an idle engine's pause)."""
        if self._compiling:
            wait([future for future, _ in self._compiling.values()], timeout_s, FIRST_COMPLETED)

    @property
    def num_compiling(self) -> int:
        """Requests waiting for their grammar."""
        return len(self._compiling)

    def start_filling(self, seqs: list[Sequence]) -> PendingMasks | None:
        """Starts computing the masks of the constrained ones among ``seqs`` (the sampling rows, in order)."""
        rows = [row for row, seq in enumerate(seqs) if seq.params.structured_output is not None]
        if not rows:
            return None
        matchers = [self._synced_matcher(seqs[row]) for row in rows]
        # The previous step's copy out of this buffer is done: its sampled tokens came back after it.
        size = len(rows) * self.words
        packed = self._host[: size + len(rows)]
        packed[size:].numpy()[:] = rows
        bitmask = packed[:size].view(len(rows), self.words)
        bitmask.zero_()
        return PendingMasks(rows, packed, self._worker.submit(self.compiler.backend.fill_masks, matchers, bitmask))

    def apply(self, pending: PendingMasks | None, logits: torch.Tensor) -> None:
        """Masks the constrained rows of ``logits`` [B, V] in place (waits for the masks if still being filled)."""
        if pending is None:
            return
        pending.done.result()
        with torch.inference_mode():  # the executor's logits are inference tensors
            packed = pending.packed.to(logits.device, non_blocking=True)  # the step's one copy of the masks
            num_rows = len(pending.rows)
            rows = packed[packed.shape[0] - num_rows :].long()
            constrained = logits[rows]  # [R, V]
            apply_bitmask(constrained, packed[: packed.shape[0] - num_rows].view(num_rows, self.words))
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
        """Forgets a finished request (``seqs``: all its choices), compiled or still waiting."""
        self._compiling.pop(seqs[0].request_id, None)
        for seq in seqs:
            self._matchers.pop(seq.seq_id, None)

    @property
    def num_active(self) -> int:
        return len(self._matchers)

    def shutdown(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        self.compiler.shutdown()

    def _synced_matcher(self, seq: Sequence) -> GrammarMatcher:
        matcher = self._matchers[seq.seq_id]
        num_output = seq.num_output_tokens
        if matcher.num_consumed > num_output:
            matcher.rollback(matcher.num_consumed - num_output)
        for token_id in seq.output_token_ids[matcher.num_consumed :]:
            matcher.consume(token_id)
        return matcher

    def _start_matchers(self, grammar: CompiledGrammar, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self._matchers[seq.seq_id] = grammar.new_matcher()
