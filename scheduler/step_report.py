"""What the engine core reports besides tokens: each step's statistics, the statistics of requests that finished,
and the token-expert assignment counts (flushed at most once a second while requests run, at once when idle)."""
import time

from scheduler.block_manager import BlockManager
from scheduler.core_messages import CoreRequestOutput, EngineCoreOutputs
from scheduler.request import Request
from scheduler.scheduler import Scheduler, SchedulerOutput
from scheduler.stats import RequestStats, StepStats

EXPERT_COUNTS_FLUSH_S = 1.0


class StepReporter:
    def __init__(self, executor, scheduler: Scheduler, block_manager: BlockManager) -> None:
        self.executor = executor
        self.scheduler = scheduler
        self.block_manager = block_manager
        self.num_grammar_rejections = 0  # in the current step
        self._finished: list[RequestStats] = []
        # Reports the (all zero) counts once at start-up, so every (layer, expert) series exists before traffic and
        # a rate over the first requests sees them as an increase.
        self._last_expert_flush = time.monotonic()
        self._expert_counts = self._take_expert_counts()

    def request_finished(self, request: Request) -> None:
        stats = request.stats
        stats.finished_time = time.monotonic()
        stats.finish_reason = next((r for r in ("error", "abort") if r in request.finish_reasons),
                                   request.finish_reasons[0])
        stats.num_cached_tokens = request.num_cached_tokens
        self._finished.append(stats)

    def step_stats(self, sched: SchedulerOutput, num_decode: int, duration_s: float) -> StepStats:
        rejections, self.num_grammar_rejections = self.num_grammar_rejections, 0
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
            num_grammar_rejections=rejections,
        )

    def collect(self, outputs: list[CoreRequestOutput], step: StepStats | None, idle: bool) -> EngineCoreOutputs:
        """The step's message to the front end; ``idle``: no request is left in the engine."""
        finished, self._finished = self._finished, []
        expert_counts, self._expert_counts = self._expert_counts, None
        if expert_counts is None and (idle or time.monotonic() - self._last_expert_flush >= EXPERT_COUNTS_FLUSH_S):
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
