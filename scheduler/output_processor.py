"""The front end's half of every request: token ids from the engine core become text deltas and stop strings.

One ``OutputProcessor`` per front end takes each ``EngineCoreOutputs`` (one engine step, every request at once),
detokenizes each choice incrementally, ends a choice whose text reaches a stop string (and asks the core to finish
it), and forwards the step's statistics to the stats listener. A request whose processing fails here fails alone.
"""
import logging
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from scheduler.core_messages import ChoiceDelta, CoreRequestOutput, EngineCoreOutputs, FinishChoice
from scheduler.detokenizer import IncrementalDetokenizer
from scheduler.outputs import CompletionDelta, RequestOutput
from scheduler.sampling_params import SamplingParams
from scheduler.stats import StatsListener

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # resolved
    detokenizers: list[IncrementalDetokenizer]
    num_output_tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.num_output_tokens = [0] * len(self.detokenizers)
        self.finish_reasons = [None] * len(self.detokenizers)

    @property
    def is_finished(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)

    def apply(self, choice: ChoiceDelta) -> CompletionDelta | None:
        """The text delta of one engine choice delta; None for a choice that already ended here."""
        index = choice.index
        if self.finish_reasons[index] is not None:
            return None
        detokenizer = self.detokenizers[index]
        stop_token = choice.finish_reason == "stop" and not choice.grammar_end
        feed = choice.token_ids[:-1] if stop_token else choice.token_ids
        delta = CompletionDelta(index, "", list(choice.token_ids), choice.logprobs, choice.finish_reason,
                                choice.stop_reason)
        for token_id in feed:
            self.num_output_tokens[index] += 1
            check_stop = self.num_output_tokens[index] >= self.params.min_tokens
            delta.text += detokenizer.add_tokens([token_id], check_stop=check_stop)
            if detokenizer.stop_reason is not None:
                delta.finish_reason = "stop"
                delta.stop_reason = detokenizer.stop_reason
                break
        else:
            if choice.finish_reason in ("stop", "length"):
                delta.text += detokenizer.flush()
        if delta.finish_reason is not None:
            self.finish_reasons[index] = delta.finish_reason
        return delta

    def end_unfinished_with_error(self) -> list[CompletionDelta]:
        """Ends every choice still open with finish reason "error"; their (empty) closing deltas."""
        deltas = []
        for index, reason in enumerate(self.finish_reasons):
            if reason is None:
                self.finish_reasons[index] = "error"
                deltas.append(CompletionDelta(index, "", [], finish_reason="error"))
        return deltas


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stats_listener: StatsListener | None = None) -> None:
        self.tokenizer = tokenizer
        self.stats_listener = stats_listener
        self.requests: dict[str, RequestState] = {}
        self.num_running = 0
        self.num_waiting = 0
        self.kv_cache_usage = 0.0

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """``params`` resolved (``check_request``)."""
        detokenizers = [
            IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.stop,
                                   params.include_stop_str_in_output)
            for _ in range(params.n)
        ]
        self.requests[request_id] = RequestState(request_id, prompt_token_ids, params, detokenizers)

    def remove(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def process(self, outputs: EngineCoreOutputs) -> tuple[list[RequestOutput], list[FinishChoice]]:
        """Request outputs for the callers, and the choices the engine core must now finish (stop strings, failures).

        One thread: ``claim``, ``convert`` and ``release`` in a row. A front end whose request table other threads
        change holds its lock around ``claim`` and ``release`` only, so detokenization never blocks new requests.
        """
        claimed = self.claim(outputs)
        results, to_finish = self.convert(outputs, claimed)
        self.release(claimed, results)
        return results, to_finish

    def claim(self, outputs: EngineCoreOutputs) -> list[tuple[RequestState, CoreRequestOutput]]:
        """Each output with its request's state; outputs of requests that ended here already are dropped."""
        return [(state, output) for output in outputs.outputs
                if (state := self.requests.get(output.request_id)) is not None]

    def convert(
        self, outputs: EngineCoreOutputs, claimed: list[tuple[RequestState, CoreRequestOutput]]
    ) -> tuple[list[RequestOutput], list[FinishChoice]]:
        """Detokenizes the claimed outputs and reports the step's statistics; touches no shared table. One result
        per claimed output, in order."""
        self.num_running, self.num_waiting = outputs.num_running, outputs.num_waiting
        self.kv_cache_usage = outputs.kv_cache_usage
        self._report_stats(outputs)
        results: list[RequestOutput] = []
        to_finish: list[FinishChoice] = []
        for state, output in claimed:
            try:
                result = self._apply(state, output, to_finish)
            except Exception as error:  # this request fails alone; the engine core drops it
                logger.exception("processing the output of request %s failed", state.request_id)
                result = self._fail(state, f"post-processing failed: {error!r}")
                if not output.finished:
                    to_finish.append(FinishChoice(state.request_id, None, "abort"))
            results.append(result)
        return results, to_finish

    def release(self, claimed: list[tuple[RequestState, CoreRequestOutput]], results: list[RequestOutput]) -> None:
        """Forgets the requests that finished (unless already removed or replaced meanwhile)."""
        for (state, _), result in zip(claimed, results):
            if result.finished and self.requests.get(state.request_id) is state:
                del self.requests[state.request_id]

    def fail_all(self, message: str) -> list[RequestOutput]:
        results = [self._fail(state, message) for state in self.requests.values()]
        self.requests.clear()
        return results

    def _apply(self, state: RequestState, output: CoreRequestOutput, to_finish: list[FinishChoice]) -> RequestOutput:
        deltas = []
        for choice in output.choices:
            delta = state.apply(choice)
            if delta is None:
                continue
            deltas.append(delta)
            if delta.finish_reason == "stop" and choice.finish_reason is None:
                to_finish.append(FinishChoice(state.request_id, delta.index, "stop"))
        if output.error is not None:  # the core ended every choice it still had
            deltas += state.end_unfinished_with_error()
        return RequestOutput(state.request_id, state.prompt_token_ids, deltas, state.is_finished,
                             output.num_cached_tokens, output.prompt_logprobs, output.error)

    def _fail(self, state: RequestState, message: str) -> RequestOutput:
        return RequestOutput(state.request_id, state.prompt_token_ids, state.end_unfinished_with_error(), True,
                             error=message)

    def _report_stats(self, outputs: EngineCoreOutputs) -> None:
        listener = self.stats_listener
        if listener is None:
            return
        try:
            if outputs.step is not None:
                listener.on_step(outputs.step)
            for stats in outputs.finished_requests:
                listener.on_request_finished(stats)
            if outputs.expert_counts is not None:
                layer_ids, counts = outputs.expert_counts
                listener.on_expert_counts(layer_ids, torch.tensor(counts, dtype=torch.int64))
        except Exception:  # metrics must never take a request down
            logger.exception("stats listener %s failed", listener)
