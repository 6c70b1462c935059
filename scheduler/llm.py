"""Offline batch inference through the same engine the server uses: ``LLM(model=...).generate(prompts, params)``."""
import itertools
import time
from dataclasses import dataclass, field, fields

from model.embedded import EMBEDDED_MODEL_DIR
from scheduler.config import EngineConfig
from scheduler.core_client import InprocClient, MultiprocessClient
from scheduler.core_messages import EngineCoreRequest, FinishChoice
from scheduler.output_processor import OutputProcessor
from scheduler.outputs import RequestOutput, TokenLogprob
from scheduler.request_check import check_request
from scheduler.sampling_params import SamplingParams
from scheduler.stats import StatsListener
from scheduler.structured_output.factory import create_constraint_validator
from scheduler.structured_output.validator import check_constraint
from scheduler.tokenizer import load_tokenizer


@dataclass
class Completion:
    """One finished choice."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class GenerationResult:
    """Everything one prompt produced, in the order of the prompts given to ``generate``."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None


class LLM:
    def __init__(
        self, model: str = str(EMBEDDED_MODEL_DIR), stats_listener: StatsListener | None = None,
        engine_process: bool = False, **engine_options: object,
    ) -> None:
        """``engine_process``: run the engine core in a process of its own (as the server does)."""
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise TypeError(f"unknown engine options {unknown}; known: {sorted(known - {'model'})}")
        config = EngineConfig(model=model, **engine_options)
        self.client = MultiprocessClient(config) if engine_process else InprocClient(config)
        self.engine = self.client.core if isinstance(self.client, InprocClient) else None  # the core, in-process
        self.stats_listener = stats_listener
        self.tokenizer = load_tokenizer(model)
        self.processor = OutputProcessor(self.tokenizer, stats_listener)
        info = self.client.info
        self.grammar_validator = create_constraint_validator(self.tokenizer, info.vocab_size, info.eos_token_ids)
        self._request_ids = itertools.count()

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        priority: list[int] | None = None,
    ) -> list[GenerationResult]:
        """Runs every prompt (text, or token ids) to completion; invalid input raises before anything runs.

        ``priority``: one per prompt, lower first, for an engine with ``scheduling_policy="priority"``.
        """
        if params is None:
            params = SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        priorities = priority if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompts)} prompts")
        prompt_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        info = self.client.info
        resolved = [check_request(ids, p, info.vocab_size, info.max_model_len, info.sampling_defaults)
                    for ids, p in zip(prompt_ids, params_list)]
        for p in resolved:
            check_constraint(self.grammar_validator, p)
        for request_id in list(self.processor.requests):  # left by an interrupted call
            self.processor.remove(request_id)
            self.client.finish_choices([FinishChoice(request_id, None, "abort")])
        results: dict[str, GenerationResult] = {}
        for ids, p, request_priority in zip(prompt_ids, resolved, priorities):
            request_id = f"offline-{next(self._request_ids)}"
            results[request_id] = GenerationResult(request_id, ids, [Completion(i, "") for i in range(p.n)])
            self.processor.add(request_id, ids, p)
            self.client.add_request(EngineCoreRequest(request_id, ids, p, time.monotonic(), request_priority))
        while self.processor.has_unfinished() or self.client.has_unfinished():
            outputs, to_finish = self.processor.process(self.client.get_outputs())
            self.client.finish_choices(to_finish)
            for output in outputs:
                _accumulate(results[output.request_id], output)  # the processor knows only this call's requests
        return list(results.values())

    def shutdown(self) -> None:
        self.client.shutdown()
        if isinstance(self.client, MultiprocessClient):
            self.client.close()


def _accumulate(result: GenerationResult, output: RequestOutput) -> None:
    result.num_cached_tokens = output.num_cached_tokens
    if output.prompt_logprobs is not None:
        result.prompt_logprobs = output.prompt_logprobs
    if output.error is not None:
        result.error = output.error
    for delta in output.outputs:
        completion = result.outputs[delta.index]
        completion.text += delta.text
        completion.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            completion.logprobs = (completion.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            completion.finish_reason = delta.finish_reason
            completion.stop_reason = delta.stop_reason
