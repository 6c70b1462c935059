"""The engine core: requests in, one scheduled forward + sampling per ``step()``, one batch of outputs out.

It owns the executor, the scheduler, the KV block manager and the sampler, and knows token ids only. It runs
in its own process behind ``MultiprocessClient`` (the server) or in the caller's process behind ``InprocClient``.
"""
import itertools
import logging
import time

import torch

from model.generation_config import load_generation_defaults
from scheduler.block_manager import BlockManager
from scheduler.config import EngineConfig
from scheduler.core_messages import (
    ChoiceDelta, CoreRequestOutput, EngineCoreOutputs, EngineCoreRequest, EngineInfo, FinishChoice,
)
from scheduler.device_check import check_device
from scheduler.executor_factory import create_executor
from scheduler.faults import InjectedFault, fires_at
from scheduler.kv_event_publisher import KVEventPublisher
from scheduler.kv_events import AllBlocksCleared
from scheduler.outputs import EngineDeadError, RequestRejected
from scheduler.request import Request
from scheduler.request_check import check_request
from scheduler.sampler import Sampler, SamplerOutput, logprobs_with_top
from scheduler.sampling_state import build_sampling_state
from scheduler.scheduler import Scheduler, SchedulerOutput
from scheduler.sequence import Sequence
from scheduler.stats import RequestStats, StepStats
from scheduler.step_plan import StepPlan, plan_step
from scheduler.structured_output.factory import create_structured_output
from scheduler.structured_output.manager import GrammarOutcome, PendingMasks
from scheduler.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

EXPERT_COUNTS_FLUSH_S = 1.0
GRAMMAR_WAIT_S = 0.01  # nothing could run: wait this long for a compiling grammar before the next step


class GrammarRejectedError(Exception):
    """A sampled token that the request's grammar does not accept: the request fails, it never "stops"."""


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.executor = create_executor(config)
        self.model_config = self.executor.model_config
        self.num_kv_blocks = self.executor.num_kv_blocks
        self.generation_defaults = load_generation_defaults(config.model)
        self.max_model_len = self._resolve_max_model_len(config)
        publishes_kv_events = config.kv_events_config is not None and config.kv_events_config.publishes
        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                                          record_events=publishes_kv_events)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.scheduling_policy)
        self.device = self.executor.device
        self.sampler = Sampler(config.max_num_seqs, self.model_config.vocab_size, self.device,
                               torch.Generator(self.device).manual_seed(config.seed))
        self.info = EngineInfo(
            vocab_size=self.model_config.vocab_size, max_model_len=self.max_model_len,
            num_kv_blocks=self.num_kv_blocks, device=str(self.device),
            dtype=str(self.executor.dtype).removeprefix("torch."),
            weight_dtype=self.executor.weight_dtype, weight_bytes=self.executor.weight_bytes,
            kv_cache_dtype=str(self.executor.kv_cache_dtype).removeprefix("torch."),
            attention_backend=self.executor.attention_backend, moe_backend=self.executor.moe_backend,
            cuda_graphs=self.executor.cuda_graphs,
            sampling_defaults={k: float(v) for k, v in self.generation_defaults.sampling.items()},
            eos_token_ids=list(self.generation_defaults.eos_token_ids),
        )
        # Grammar matchers and masks; llguidance reads the vocabulary from the checkpoint's own tokenizer.
        self.structured_output = create_structured_output(
            load_tokenizer(config.model), self.model_config.vocab_size, self.generation_defaults.eos_token_ids
        )
        self._requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._pending: list[CoreRequestOutput] = []  # outputs of aborts and failed adds, sent with the next step
        self._finished_stats: list[RequestStats] = []
        self._num_forwards = 0
        self._num_grammar_rejections = 0  # in the current step
        # Reports the (all zero) counts once at start-up, so every (layer, expert) series exists before traffic and
        # a rate over the first requests sees them as an increase.
        self._last_expert_flush = time.monotonic()
        self._expert_counts = self._take_expert_counts()
        self.kv_events = self._start_kv_events(config) if publishes_kv_events else None  # last: it binds sockets

    def add_request(self, request: EngineCoreRequest) -> None:
        """Admits a request; one that fails the check ends at once with an error output (the front end checked it)."""
        try:
            self._add(request)
        except (RequestRejected, ValueError) as error:
            self._pending.append(CoreRequestOutput(request.request_id, [], True, error=str(error)))

    def finish_choices(self, items: list[FinishChoice]) -> None:
        """Ends choices (a stop string, an abort) and frees their blocks; unknown or finished ones are ignored."""
        for item in items:
            request = self._requests.get(item.request_id)
            if request is None:
                continue
            indices = range(len(request.seqs)) if item.index is None else [item.index]
            deltas = []
            for index in indices:
                if (delta := request.end_choice(index, item.reason)) is not None:
                    self._finish_seq(request.seqs[index])
                    deltas.append(delta)
            if deltas:
                self._pending.append(request.make_output(deltas))
            if request.is_finished:
                self._finalize(request)

    def abort_all(self) -> None:
        self.finish_choices([FinishChoice(request_id, None, "abort") for request_id in self._requests])

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def step(self) -> EngineCoreOutputs:
        started = time.monotonic()
        outputs, self._pending = self._pending, []
        for request_id, error in self.structured_output.take_compiled():
            outputs.append(self._end_request(self._requests[request_id], "error", error))
        sched = self.scheduler.schedule()
        num_decode_tokens = sched.num_decode_tokens  # before the step: it moves (and finishes) sequences
        for seq in sched.preempted:
            self._on_preempted(seq)
        if sched.scheduled:
            for seq, _ in sched.scheduled:
                stats = self._requests[seq.request_id].stats
                if stats.first_scheduled_time is None:
                    stats.first_scheduled_time = started
            outputs += self._run(sched)
        step = None
        if sched.scheduled or sched.preempted:
            step = self._step_stats(sched, num_decode_tokens, time.monotonic() - started)
        else:
            self.structured_output.wait_for_compiles(GRAMMAR_WAIT_S)
        if self.kv_events is not None:
            self.kv_events.publish(self.block_manager.take_events())
        return self._collect(outputs, step)

    def shutdown(self) -> None:
        self.abort_all()
        self.close()

    def close(self) -> None:
        """Releases the model and the mask worker (after the last step)."""
        self.structured_output.shutdown()
        self.executor.shutdown()
        if self.kv_events is not None:
            self.kv_events.close()

    def _run(self, sched: SchedulerOutput) -> list[CoreRequestOutput]:
        plan = plan_step(sched.scheduled, self.block_manager.block_size)
        self._num_forwards += 1
        try:
            masks = self.structured_output.start_filling(plan.sample_seqs)  # on the CPU while the forward runs
            if fires_at("STEP_AT", self._num_forwards):
                raise InjectedFault(f"injected failure of forward {self._num_forwards}")
            logits = self.executor.execute(plan.batch)  # [L, V]
        except EngineDeadError:  # the executor cannot run again (a tensor-parallel rank is gone)
            raise
        except Exception as error:  # a failing forward fails this batch only, while the device still works
            if not isinstance(error, torch.OutOfMemoryError):
                check_device(self.device)
            logger.exception("engine step failed; failing the requests in its batch")
            batch_request_ids = dict.fromkeys(seq.request_id for seq, _ in sched.scheduled)
            return [self._end_request(self._requests[rid], "error", f"engine step failed: {error!r}")
                    for rid in batch_request_ids]
        self.scheduler.finish_step(sched)
        failed: dict[str, str] = {}
        self._record_prompt_logprobs(plan, logits, failed)
        sampled = self._sample(plan, logits, masks, failed)
        return self._apply_samples(plan.sample_seqs, sampled, failed)

    def _sample(
        self, plan: StepPlan, logits: torch.Tensor, masks: PendingMasks | None, failed: dict[str, str]
    ) -> SamplerOutput | None:
        """The step's one sampling point: logits rows of ``plan.sample_seqs`` -> one token each.

        Grammar masks apply first (logprobs are those of the masked logits). A batch that fails to sample fails
        its requests once (a retry would count penalties and draw from seeded generators a second time).
        """
        if not plan.sample_seqs:
            return None
        all_rows = len(plan.sample_rows) == logits.shape[0]  # every row samples, in order (decode steps)
        rows = logits if all_rows else logits[plan.sample_rows]  # [B, V]
        try:
            self.structured_output.apply(masks, rows)
        except Exception as error:  # the constrained requests fail; the others sample as usual
            logger.exception("applying the grammar masks failed")
            for row in masks.rows:
                failed.setdefault(plan.sample_seqs[row].request_id, f"grammar masks failed: {error!r}")
        try:
            return self.sampler.sample(rows, plan.sample_seqs)
        except Exception as error:  # the batch fails once: no retry that would count penalties or draw seeds twice
            logger.exception("sampling the batch failed; failing its requests")
            for seq in plan.sample_seqs:
                failed.setdefault(seq.request_id, f"sampling failed: {error!r}")
            return None

    def _apply_samples(
        self, seqs: list[Sequence], sampled: SamplerOutput | None, failed: dict[str, str]
    ) -> list[CoreRequestOutput]:
        now = time.monotonic()
        deltas: dict[str, list[ChoiceDelta]] = {}
        if sampled is not None:
            for seq, token_id, logprob in zip(seqs, sampled.token_ids, sampled.logprobs):
                if seq.request_id in failed:
                    continue
                request = self._requests[seq.request_id]
                try:
                    deltas.setdefault(request.request_id, []).append(self._postprocess(request, seq, token_id, logprob, now))
                except GrammarRejectedError as error:  # the mask allowed a token the matcher refuses
                    logger.error("request %s: %s", request.request_id, error)
                    self._num_grammar_rejections += 1
                    failed[request.request_id] = str(error)
                except Exception as error:  # this request fails alone
                    logger.exception("post-processing request %s failed", request.request_id)
                    failed[request.request_id] = f"post-processing failed: {error!r}"
        outputs = []
        for request_id, error in failed.items():
            if request_id in self._requests:
                deltas.pop(request_id, None)
                outputs.append(self._end_request(self._requests[request_id], "error", error))
        for request_id, request_deltas in deltas.items():
            request = self._requests[request_id]
            outputs.append(request.make_output(request_deltas))
            if request.is_finished:
                self._finalize(request)
        return outputs

    def _postprocess(self, request: Request, seq: Sequence, token_id: int, logprob, now: float) -> ChoiceDelta:
        delta = request.append_token(seq, token_id, logprob)
        outcome = self.structured_output.advance(seq, token_id)
        if outcome is GrammarOutcome.REJECTED:
            raise GrammarRejectedError(f"the grammar rejected token {token_id} of choice {seq.index}")
        if outcome is GrammarOutcome.COMPLETED and delta.finish_reason is None:
            request.end_with_grammar(delta)  # the grammar is complete: its last token is text, the choice stops
        request.stats.generation_tokens += 1
        request.stats.token_times.append(now)
        if request.stats.first_token_time is None:
            request.stats.first_token_time = now
        if seq.index == 0 and not request.forked:
            seq.needs_prompt_logprobs = False  # the prompt is complete
            self._fork_choices(request)
        if delta.finish_reason is not None:
            self._finish_seq(seq)
        return delta

    def _add(self, core_request: EngineCoreRequest) -> None:
        request_id = core_request.request_id
        if request_id in self._requests:
            raise RequestRejected(f"request id {request_id!r} is already in use", code="duplicate_request_id")
        prompt = list(core_request.prompt_token_ids)
        resolved = check_request(prompt, core_request.params, self.info.vocab_size, self.max_model_len,
                                 self.info.sampling_defaults)
        stop_token_ids = set(resolved.stop_token_ids)
        if not resolved.ignore_eos:
            stop_token_ids.update(self.generation_defaults.eos_token_ids)
        seqs = []
        for index in range(resolved.n):
            seq = Sequence(
                seq_id=next(self._seq_ids), request_id=request_id, index=index, token_ids=list(prompt),
                num_prompt_tokens=len(prompt), params=resolved,
                needs_prompt_logprobs=index == 0 and resolved.prompt_logprobs is not None,
                priority=core_request.priority,
            )
            seq.sampling = build_sampling_state(resolved, self.info.vocab_size, self.info.eos_token_ids, self.device,
                                                self._choice_generator(resolved.seed, index))
            seqs.append(seq)
        self.structured_output.add(seqs)  # the grammar compiles off the step; until then the request waits
        arrival = core_request.arrival_time
        self._requests[request_id] = Request(
            request_id=request_id, params=resolved, seqs=seqs,
            stats=RequestStats(request_id, arrival, len(prompt)),
            stop_token_ids=frozenset(stop_token_ids), max_model_len=self.max_model_len,
            prompt_logprobs=[None] if resolved.prompt_logprobs is not None else None,
        )
        self.scheduler.add(seqs[0])

    def _fork_choices(self, request: Request) -> None:
        """Choices 1..n-1 start from choice 0's computed prompt blocks; each recomputes only the last partial block."""
        request.forked = True
        parent = request.seqs[0]
        children = [child for child in request.seqs[1:] if not child.is_finished]
        for child in children:
            self.block_manager.fork(parent, child, parent.num_prompt_tokens - 1)
        self.scheduler.add_forks(parent, children)

    def _record_prompt_logprobs(self, plan: StepPlan, logits: torch.Tensor, failed: dict[str, str]) -> None:
        for span in plan.prompt_logprob_spans:
            seq = span.seq
            try:
                targets = seq.token_ids[span.first_position + 1 : span.first_position + 1 + span.num_rows]
                rows = logits[span.first_row : span.first_row + span.num_rows]
                k = seq.params.prompt_logprobs
                self._requests[seq.request_id].prompt_logprobs.extend(logprobs_with_top(rows, targets, [k] * len(targets)))
            except Exception as error:
                logger.exception("prompt logprobs of request %s failed", seq.request_id)
                failed.setdefault(seq.request_id, f"prompt logprobs failed: {error!r}")

    def _finish_seq(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.sampler.release(seq)

    def _on_preempted(self, seq: Sequence) -> None:
        self.sampler.release(seq)  # its penalty counts are rebuilt from its tokens when it samples again
        request = self._requests[seq.request_id]
        request.stats.num_preemptions += 1
        if seq.needs_prompt_logprobs:
            request.prompt_logprobs = [None]  # recomputed from the start with the prompt

    def _end_request(self, request: Request, reason: str, error: str | None = None) -> CoreRequestOutput:
        for seq in request.seqs:
            if not seq.is_finished:
                self._finish_seq(seq)
        output = request.make_output(request.end_unfinished(reason), error=error)
        self._finalize(request)
        return output

    def _finalize(self, request: Request) -> None:
        del self._requests[request.request_id]
        self.structured_output.release(request.seqs)
        stats = request.stats
        stats.finished_time = time.monotonic()
        stats.finish_reason = next((r for r in ("error", "abort") if r in request.finish_reasons), request.finish_reasons[0])
        stats.num_cached_tokens = request.num_cached_tokens
        self._finished_stats.append(stats)

    def _step_stats(self, sched: SchedulerOutput, num_decode: int, duration_s: float) -> StepStats:
        return StepStats(
            duration_s=duration_s,
            num_seqs=len(sched.scheduled),
            num_prefill_tokens=sched.num_tokens - num_decode,
            num_decode_tokens=num_decode,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.block_manager.usage(),
            prefix_cache_queries=sched.prefix_cache_queries,
            prefix_cache_hits=sched.prefix_cache_hits,
            num_preemptions=len(sched.preempted),
            num_grammar_rejections=self._take_grammar_rejections(),
        )

    def _take_grammar_rejections(self) -> int:
        count, self._num_grammar_rejections = self._num_grammar_rejections, 0
        return count

    def _collect(self, outputs: list[CoreRequestOutput], step: StepStats | None) -> EngineCoreOutputs:
        finished, self._finished_stats = self._finished_stats, []
        expert_counts, self._expert_counts = self._expert_counts, None
        now = time.monotonic()
        if expert_counts is None and (not self._requests or now - self._last_expert_flush >= EXPERT_COUNTS_FLUSH_S):
            expert_counts = self._take_expert_counts()
        return EngineCoreOutputs(
            outputs=outputs, num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.block_manager.usage(), step=step, finished_requests=finished,
            expert_counts=expert_counts,
        )

    def _take_expert_counts(self) -> tuple[list[int], list[list[int]]] | None:
        self._last_expert_flush = time.monotonic()
        counts = self.executor.take_expert_counts()
        if counts is None:
            return None
        layer_ids, tensor = counts
        return layer_ids, tensor.tolist()

    def _start_kv_events(self, config: EngineConfig) -> KVEventPublisher:
        """The publisher, after a first AllBlocksCleared: whatever an indexer kept of this replica is stale."""
        if not config.enable_prefix_caching:
            logger.warning("KV cache events are enabled without prefix caching: no block is ever stored")
        publisher = KVEventPublisher(config.kv_events_config, config.block_size)
        publisher.publish([AllBlocksCleared()])
        return publisher

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
