"""One request inside the engine core: its choices, their stop checks on token ids, and its statistics.

Text (detokenization, stop strings) is the front end's: a stop string it finds comes back as a FinishChoice.
"""
from dataclasses import dataclass, field

from scheduler.core_messages import ChoiceDelta, CoreRequestOutput
from scheduler.outputs import TokenLogprob
from scheduler.sampling_params import SamplingParams
from scheduler.sequence import Sequence
from scheduler.stats import RequestStats


@dataclass(eq=False)
class Request:
    """``seqs[i]`` is choice i. ``seqs[0]`` computes the prompt; the others fork from it once it has (``forked``)."""

    request_id: str
    params: SamplingParams  # resolved: defaults filled in, max_tokens set
    seqs: list[Sequence]
    stats: RequestStats
    stop_token_ids: frozenset[int]  # the request's stop_token_ids, plus EOS unless ignore_eos
    max_model_len: int
    prompt_logprobs: list[TokenLogprob | None] | None = None  # filled while the prompt is computed
    forked: bool = False
    sent_first_output: bool = False
    finish_reasons: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.finish_reasons = [None] * len(self.seqs)

    @property
    def is_finished(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)

    @property
    def num_cached_tokens(self) -> int:
        return self.seqs[0].num_cached_tokens or 0

    def append_token(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None) -> ChoiceDelta:
        """Adds a sampled token to choice ``seq``; the delta has a finish reason if the token ends it."""
        seq.token_ids.append(token_id)
        delta = ChoiceDelta(seq.index, [token_id], [logprob] if logprob is not None else None)
        if token_id in self.stop_token_ids:
            delta.finish_reason = "stop"
            delta.stop_reason = token_id if token_id in self.params.stop_token_ids else None
        elif seq.num_output_tokens >= self.params.max_tokens or seq.num_tokens >= self.max_model_len:
            delta.finish_reason = "length"
        if delta.finish_reason is not None:
            self.finish_reasons[seq.index] = delta.finish_reason
        return delta

    def end_with_grammar(self, delta: ChoiceDelta) -> None:
        """Ends the choice of ``delta`` (its last token completed the request's grammar) with "stop"."""
        delta.finish_reason = "stop"
        delta.grammar_end = True
        self.finish_reasons[delta.index] = "stop"

    def end_choice(self, index: int, reason: str) -> ChoiceDelta | None:
        if self.finish_reasons[index] is not None:
            return None
        self.finish_reasons[index] = reason
        return ChoiceDelta(index, [], finish_reason=reason)

    def end_unfinished(self, reason: str) -> list[ChoiceDelta]:
        """Ends every choice still going with ``reason`` ("abort" or "error")."""
        return [delta for index in range(len(self.seqs)) if (delta := self.end_choice(index, reason)) is not None]

    def make_output(self, deltas: list[ChoiceDelta], error: str | None = None) -> CoreRequestOutput:
        output = CoreRequestOutput(self.request_id, deltas, self.is_finished, self.num_cached_tokens, error=error)
        if not self.sent_first_output:
            output.prompt_logprobs = self.prompt_logprobs
            self.sent_first_output = True
        return output
