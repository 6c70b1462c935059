"""One request inside the engine: its choices, their text streams and stop checks, and its statistics."""
from dataclasses import dataclass, field

from scheduler.detokenizer import IncrementalDetokenizer
from scheduler.outputs import CompletionDelta, RequestOutput, TokenLogprob
from scheduler.sampling_params import SamplingParams
from scheduler.sequence import Sequence
from scheduler.stats import RequestStats


@dataclass(eq=False)
class Request:
    """``seqs[i]`` is choice i. ``seqs[0]`` computes the prompt; the others fork from it once it has (``forked``)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # resolved: defaults filled in, max_tokens set
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
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

    def append_token(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None) -> CompletionDelta:
        """Adds a sampled token to choice ``seq`` and returns what it contributes, with a finish reason if it ends."""
        seq.token_ids.append(token_id)
        detokenizer = self.detokenizers[seq.index]
        delta = CompletionDelta(seq.index, "", [token_id], [logprob] if logprob is not None else None)
        if token_id in self.stop_token_ids:
            delta.text = detokenizer.flush()
            delta.finish_reason = "stop"
            delta.stop_reason = token_id if token_id in self.params.stop_token_ids else None
        else:
            delta.text = detokenizer.add_tokens([token_id], check_stop=seq.num_output_tokens >= self.params.min_tokens)
            if detokenizer.stop_reason is not None:
                delta.finish_reason = "stop"
                delta.stop_reason = detokenizer.stop_reason
            elif seq.num_output_tokens >= self.params.max_tokens or seq.num_tokens >= self.max_model_len:
                delta.text += detokenizer.flush()
                delta.finish_reason = "length"
        if delta.finish_reason is not None:
            self.finish_reasons[seq.index] = delta.finish_reason
        return delta

    def end_choice(self, seq: Sequence, delta: CompletionDelta, reason: str) -> None:
        """Ends choice ``seq`` after ``delta`` (its last token), releasing the text held back for stop strings."""
        delta.text += self.detokenizers[seq.index].flush()
        delta.finish_reason = reason
        self.finish_reasons[seq.index] = reason

    def end_unfinished(self, reason: str) -> list[CompletionDelta]:
        """Ends every choice still going with ``reason`` ("abort" or "error"); their held-back text is dropped."""
        deltas = []
        for index, finished in enumerate(self.finish_reasons):
            if finished is None:
                self.finish_reasons[index] = reason
                deltas.append(CompletionDelta(index, "", [], finish_reason=reason))
        return deltas

    def make_output(self, deltas: list[CompletionDelta], error: str | None = None) -> RequestOutput:
        output = RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            outputs=deltas,
            finished=self.is_finished,
            num_cached_tokens=self.num_cached_tokens,
            error=error,
        )
        if not self.sent_first_output:
            output.prompt_logprobs = self.prompt_logprobs
            self.sent_first_output = True
        return output
