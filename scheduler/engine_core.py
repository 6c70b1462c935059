"""The engine core: requests in, one scheduled forward + sampling per ``step()``, one batch of outputs out.

It owns the executor, the scheduler, the KV block manager and the sampler, and knows token ids only; requests are
built by ``RequestBuilder`` and the step's statistics by ``StepReporter``. It runs in its own process behind
``MultiprocessClient`` (the server) or in the caller's process behind ``InprocClient``.
"""
import logging
import time

import torch

from model.generation_config import load_generation_defaults
from scheduler.block_manager import BlockManager
from scheduler.config import EngineConfig
from scheduler.context_length import resolve_max_model_len
from scheduler.core_messages import (
    ChoiceDelta, CoreRequestOutput, EngineCoreOutputs, EngineCoreRequest, EngineInfo, FinishChoice,
)
from scheduler.device_check import check_device
from scheduler.executor_factory import create_executor
from scheduler.faults import InjectedFault, fires_at
from scheduler.kv_event_publisher import start_kv_event_publisher
from scheduler.outputs import EngineDeadError, RequestRejected
from scheduler.prompt_logprobs import record_prompt_logprobs
from scheduler.request import Request
from scheduler.request_builder import RequestBuilder
from scheduler.sampler import Sampler, SamplerOutput
from scheduler.scheduler import Scheduler, SchedulerOutput
from scheduler.sequence import Sequence
from scheduler.step_plan import StepPlan, plan_step
from scheduler.step_report import StepReporter
from scheduler.structured_output.factory import create_structured_output
from scheduler.structured_output.manager import GrammarOutcome, PendingMasks
from scheduler.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

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
        self.max_model_len = resolve_max_model_len(config.max_model_len, self.model_config.max_position_embeddings,
                                                   self.num_kv_blocks * config.block_size)
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
            load_tokenizer(config.model), self.model_config.vocab_size, self.generation_defaults.eos_token_ids,
            config.max_num_seqs, self.device,
        )
        self.builder = RequestBuilder(self.model_config.vocab_size, self.info.eos_token_ids, self.max_model_len,
                                      self.device)
        self.report = StepReporter(self.executor, self.scheduler, self.block_manager)
        self._requests: dict[str, Request] = {}
        self._pending: list[CoreRequestOutput] = []  # outputs of aborts and failed adds, sent with the next step
        self._num_forwards = 0
        self.kv_events = start_kv_event_publisher(config) if publishes_kv_events else None  # last: binds sockets

    def add_request(self, request: EngineCoreRequest) -> None:
        """Admits a request, trusting its parameters (a front end resolved them with ``check_request``); one that
        cannot be admitted (a request id in use) ends at once with an error output."""
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
            step = self.report.step_stats(sched, num_decode_tokens, time.monotonic() - started)
        else:
            self.structured_output.wait_for_compiles(GRAMMAR_WAIT_S)
        if self.kv_events is not None:
            self.kv_events.publish(self.block_manager.take_events())
        return self.report.collect(outputs, step, idle=not self._requests)

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
        record_prompt_logprobs(plan, logits, self._requests, failed)
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
                    delta = self._postprocess(request, seq, token_id, logprob, now)
                    deltas.setdefault(request.request_id, []).append(delta)
                except GrammarRejectedError as error:  # the mask allowed a token the matcher refuses
                    logger.error("request %s: %s", request.request_id, error)
                    self.report.num_grammar_rejections += 1
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
        request = self.builder.build(core_request, core_request.params)  # a front end checked and resolved them
        self.structured_output.add(request.seqs)  # the grammar compiles off the step; until then the request waits
        self._requests[request_id] = request
        self.scheduler.add(request.seqs[0])

    def _fork_choices(self, request: Request) -> None:
        """Choices 1..n-1 start from choice 0's computed prompt blocks; each recomputes only the last partial block."""
        request.forked = True
        parent = request.seqs[0]
        children = [child for child in request.seqs[1:] if not child.is_finished]
        for child in children:
            self.block_manager.fork(parent, child, parent.num_prompt_tokens - 1)
        self.scheduler.add_forks(parent, children)

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
        self.report.request_finished(request)
