"""The synchronous engine core: requests in, one scheduled forward + sampling per ``step()``, output deltas out."""
import itertools
import logging
import time

import torch

from model.generation_config import load_generation_defaults
from scheduler.block_manager import BlockManager
from scheduler.config import EngineConfig
from scheduler.detokenizer import IncrementalDetokenizer
from scheduler.executor_factory import create_executor
from scheduler.outputs import CompletionDelta, EngineDeadError, RequestOutput, RequestRejected
from scheduler.request import Request
from scheduler.sampler import Sampler, logprobs_with_top
from scheduler.sampling_params import InvalidParameterError, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerOutput
from scheduler.sequence import Sequence
from scheduler.stats import RequestStats, StatsListener, StepStats
from scheduler.structured_output.factory import create_structured_output
from scheduler.step_plan import StepPlan, plan_step
from scheduler.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

EXPERT_COUNTS_FLUSH_S = 1.0


class LLMEngine:
    def __init__(self, config: EngineConfig, stats_listener: StatsListener | None = None) -> None:
        self.config = config
        self.executor = create_executor(config)
        self.model_config = self.executor.model_config
        self.num_kv_blocks = self.executor.num_kv_blocks
        self.tokenizer = load_tokenizer(config.model)
        self.generation_defaults = load_generation_defaults(config.model)
        self.max_model_len = self._resolve_max_model_len(config)
        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.device = self.executor.device
        self.sampler = Sampler(
            self.generation_defaults.eos_token_ids, torch.Generator(self.device).manual_seed(config.seed)
        )
        # [structured-output hook 1/7: create] grammar compiler and per-sequence matchers.
        self.structured_output = create_structured_output(
            self.tokenizer, self.model_config.vocab_size, self.generation_defaults.eos_token_ids
        )
        self.stats_listener = stats_listener
        self._requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._last_expert_flush = time.monotonic()
        # Reports the (all zero) counts once at start-up, so every (layer, expert) series exists before traffic and
        # a rate over the first requests sees them as an increase.
        self._flush_expert_counts(force=True)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Validates a request without adding it; returns its resolved parameters (``max_tokens`` always set).

        Raises InvalidParameterError (a bad value) or RequestRejected (it can never fit).
        """
        if not prompt_token_ids:
            raise InvalidParameterError("prompt", "the prompt must contain at least one token")
        vocab_size = self.model_config.vocab_size
        outside = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
        if outside is not None:
            raise InvalidParameterError("prompt", f"prompt token id {outside} is outside the vocabulary (0..{vocab_size - 1})")
        resolved = params.with_defaults(self.generation_defaults.sampling)
        resolved.validate(vocab_size)
        self.structured_output.check(resolved)  # [structured-output hook 2/7: compile or find cached]
        num_prompt = len(prompt_token_ids)
        completion = resolved.max_tokens if resolved.max_tokens is not None else max(1, self.max_model_len - num_prompt)
        if num_prompt + completion > self.max_model_len:
            raise RequestRejected(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{num_prompt + completion} tokens ({num_prompt} in the prompt, {completion} in the completion). "
                "Please reduce the length of the prompt or of the completion (max_tokens).",
                code="context_length_exceeded",
            )
        if resolved.min_tokens > completion:
            raise InvalidParameterError("min_tokens", f"min_tokens ({resolved.min_tokens}) exceeds the {completion} tokens this request can generate")
        resolved.max_tokens = completion
        return resolved

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float | None = None
    ) -> None:
        if request_id in self._requests:
            raise RequestRejected(f"request id {request_id!r} is already in use", code="duplicate_request_id")
        resolved = self.check_request(prompt_token_ids, params)
        prompt = list(prompt_token_ids)
        seqs = [
            Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                index=index,
                token_ids=list(prompt),
                num_prompt_tokens=len(prompt),
                params=resolved,
                generator=self._choice_generator(resolved.seed, index),
                needs_prompt_logprobs=index == 0 and resolved.prompt_logprobs is not None,
            )
            for index in range(resolved.n)
        ]
        stop_token_ids = set(resolved.stop_token_ids)
        if not resolved.ignore_eos:
            stop_token_ids.update(self.generation_defaults.eos_token_ids)
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt,
            params=resolved,
            seqs=seqs,
            detokenizers=[
                IncrementalDetokenizer(self.tokenizer, resolved.skip_special_tokens, resolved.stop, resolved.include_stop_str_in_output)
                for _ in seqs
            ],
            stats=RequestStats(request_id, arrival_time if arrival_time is not None else time.monotonic(), len(prompt)),
            stop_token_ids=frozenset(stop_token_ids),
            max_model_len=self.max_model_len,
            prompt_logprobs=[None] if resolved.prompt_logprobs is not None else None,
        )
        self._requests[request_id] = request
        self.scheduler.add(seqs[0])

    def abort(self, request_id: str) -> RequestOutput | None:
        """Ends the request with finish reason "abort" and frees its blocks; None if it is unknown or finished."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        return self._end_request(request, "abort")

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def request_ids(self) -> list[str]:
        return list(self._requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def kv_cache_usage(self) -> float:
        return self.block_manager.usage()

    def step(self) -> list[RequestOutput]:
        started = time.monotonic()
        sched = self.scheduler.schedule()
        for seq in sched.preempted:
            self._on_preempted(seq)
        outputs: list[RequestOutput] = []
        if sched.scheduled:
            for seq, _ in sched.scheduled:
                stats = self._requests[seq.request_id].stats
                if stats.first_scheduled_time is None:
                    stats.first_scheduled_time = started
            plan = plan_step(sched.scheduled, self.block_manager.block_size)
            try:
                # [structured-output hook 3/7: fill masks] in a worker thread while the forward runs.
                masks = self.structured_output.start_filling(plan.sample_seqs)
                logits = self.executor.execute(plan.batch)  # [L, V]
                sampled = None
                if plan.sample_seqs:
                    sample_logits = logits[plan.sample_rows]  # [B, V]
                    self.structured_output.apply(masks, sample_logits)  # [structured-output hook 4/7: apply masks]
                    sampled = self.sampler.sample(sample_logits, plan.sample_seqs)
                self._record_prompt_logprobs(plan, logits)
            except EngineDeadError:  # the executor cannot run again (a tensor-parallel rank is gone)
                raise
            except Exception as error:  # a failing forward fails this batch only; the engine keeps serving
                logger.exception("engine step failed; failing the requests in its batch")
                batch_request_ids = dict.fromkeys(seq.request_id for seq, _ in sched.scheduled)
                outputs = [self._end_request(self._requests[rid], "error", f"engine step failed: {error!r}") for rid in batch_request_ids]
            else:
                self.scheduler.finish_step(sched)
                if sampled is not None:
                    outputs = self._apply_samples(plan.sample_seqs, sampled.token_ids, sampled.logprobs)
        if sched.scheduled or sched.preempted:
            self._record_step(sched, time.monotonic() - started)
        self._flush_expert_counts(force=not self._requests)
        return outputs

    def shutdown(self) -> None:
        for request_id in list(self._requests):
            self.abort(request_id)
        self.structured_output.shutdown()  # [structured-output hook 7/7]
        self.executor.shutdown()

    def _apply_samples(self, seqs: list[Sequence], token_ids: list[int], logprobs: list) -> list[RequestOutput]:
        now = time.monotonic()
        deltas: dict[str, list[CompletionDelta]] = {}
        for seq, token_id, logprob in zip(seqs, token_ids, logprobs):
            request = self._requests[seq.request_id]
            delta = request.append_token(seq, token_id, logprob)
            # [structured-output hook 5/7: advance] and end the choice when its grammar is complete.
            if self.structured_output.advance(seq, token_id) and delta.finish_reason is None:
                request.end_choice(seq, delta, "stop")
            deltas.setdefault(request.request_id, []).append(delta)
            request.stats.generation_tokens += 1
            request.stats.token_times.append(now)
            if request.stats.first_token_time is None:
                request.stats.first_token_time = now
            if seq.index == 0 and not request.forked:
                seq.needs_prompt_logprobs = False  # the prompt is complete
                self._fork_choices(request)
            if delta.finish_reason is not None:
                self.scheduler.finish(seq)
        outputs = []
        for request_id, request_deltas in deltas.items():
            request = self._requests[request_id]
            outputs.append(request.make_output(request_deltas))
            if request.is_finished:
                self._finalize(request)
        return outputs

    def _fork_choices(self, request: Request) -> None:
        """Choices 1..n-1 start from choice 0's computed prompt blocks; each recomputes only the last partial block."""
        request.forked = True
        parent = request.seqs[0]
        children = request.seqs[1:]
        for child in children:
            self.block_manager.fork(parent, child, parent.num_prompt_tokens - 1)
        self.scheduler.add_first(children)

    def _record_prompt_logprobs(self, plan: StepPlan, logits: torch.Tensor) -> None:
        for span in plan.prompt_logprob_spans:
            seq = span.seq
            targets = seq.token_ids[span.first_position + 1 : span.first_position + 1 + span.num_rows]
            rows = logits[span.first_row : span.first_row + span.num_rows]
            target_tensor = torch.tensor(targets, device=logits.device)
            k = seq.params.prompt_logprobs
            self._requests[seq.request_id].prompt_logprobs.extend(logprobs_with_top(rows, target_tensor, [k] * len(targets)))

    def _on_preempted(self, seq: Sequence) -> None:
        request = self._requests[seq.request_id]
        request.stats.num_preemptions += 1
        if seq.needs_prompt_logprobs:
            request.prompt_logprobs = [None]  # recomputed from the start with the prompt

    def _end_request(self, request: Request, reason: str, error: str | None = None) -> RequestOutput:
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
        output = request.make_output(request.end_unfinished(reason), error=error)
        self._finalize(request)
        return output

    def _finalize(self, request: Request) -> None:
        del self._requests[request.request_id]
        self.structured_output.release(request.seqs)  # [structured-output hook 6/7: release]
        stats = request.stats
        stats.finished_time = time.monotonic()
        stats.finish_reason = next((r for r in ("error", "abort") if r in request.finish_reasons), request.finish_reasons[0])
        stats.num_cached_tokens = request.num_cached_tokens
        if self.stats_listener is not None:
            self._notify(self.stats_listener.on_request_finished, stats)

    def _record_step(self, sched: SchedulerOutput, duration_s: float) -> None:
        if self.stats_listener is None:
            return
        num_decode = sched.num_decode_tokens
        step = StepStats(
            duration_s=duration_s,
            num_seqs=len(sched.scheduled),
            num_prefill_tokens=sched.num_tokens - num_decode,
            num_decode_tokens=num_decode,
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_cache_usage=self.kv_cache_usage(),
            prefix_cache_queries=sched.prefix_cache_queries,
            prefix_cache_hits=sched.prefix_cache_hits,
            num_preemptions=len(sched.preempted),
        )
        self._notify(self.stats_listener.on_step, step)

    def _flush_expert_counts(self, force: bool) -> None:
        now = time.monotonic()
        if self.stats_listener is None or (not force and now - self._last_expert_flush < EXPERT_COUNTS_FLUSH_S):
            return
        self._last_expert_flush = now
        counts = self.executor.take_expert_counts()
        if counts is not None:
            self._notify(self.stats_listener.on_expert_counts, *counts)

    def _notify(self, callback, *args) -> None:
        try:
            callback(*args)
        except Exception:  # metrics must never take the engine down
            logger.exception("stats listener %s failed", callback)

    def _choice_generator(self, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        # Each choice gets its own stream; choice 0 uses the request's seed as given.
        return torch.Generator(self.device).manual_seed((seed + index * 0x9E3779B97F4A7C15) % 2**64)

    def _resolve_max_model_len(self, config: EngineConfig) -> int:
        limit = self.model_config.max_position_embeddings
        max_model_len = config.max_model_len if config.max_model_len is not None else limit
        if not 1 <= max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [1, {limit}] (the model's max_position_embeddings), got {max_model_len}")
        pool_tokens = self.num_kv_blocks * config.block_size
        if max_model_len > pool_tokens:
            logger.warning("max_model_len lowered from %d to %d: the KV cache holds no more", max_model_len, pool_tokens)
            max_model_len = pool_tokens
        return max_model_len
