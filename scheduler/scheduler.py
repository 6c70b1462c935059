"""Picks what runs each step under a token budget and a sequence budget, and preempts when KV blocks run out.

Running decodes go first, then running prefills, then waiting sequences in the policy's order (``waiting_queue.py``:
arrival, or priority then arrival; one whose grammar is still compiling is passed over); the last prefill is chunked
to fill the token budget. When a running sequence cannot get a block, a running sequence is preempted (the most
recently admitted, or under the priority policy the lowest priority): its blocks are freed and it is recomputed later
from its token ids (prompt and output so far). Prompts that need prompt logprobs compute at most
``MAX_PROMPT_LOGPROB_ROWS_PER_STEP`` positions per step in all (each position costs a log-softmax over the vocabulary
and a copy to the host).
"""
import itertools
from dataclasses import dataclass, field

from scheduler.block_manager import BlockManager
from scheduler.sequence import Sequence, SequenceStatus
from scheduler.waiting_queue import SchedulingPolicy, WaitingQueue, preemption_victim

MAX_PROMPT_LOGPROB_ROWS_PER_STEP = 512


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens this step)
    preempted: list[Sequence] = field(default_factory=list)
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache at admission
    prefix_cache_hits: int = 0  # of those, tokens found

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for seq, n in self.scheduled if n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
        policy: SchedulingPolicy = "fcfs",
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.waiting = WaitingQueue(policy)
        self.running: list[Sequence] = []  # in admission order
        self._arrivals = itertools.count()

    def add(self, seq: Sequence) -> None:
        seq.arrival_order = next(self._arrivals)
        self.waiting.add(seq)

    def add_forks(self, parent: Sequence, children: list[Sequence]) -> None:
        """Queues choices forked from ``parent`` (which ran) ahead of their equals, in their given order."""
        for child in children:
            child.priority, child.arrival_order = parent.priority, parent.arrival_order
        self.waiting.put_back(children)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        scheduled: dict[Sequence, int] = {}
        budget = self.max_num_batched_tokens
        prompt_logprob_rows = MAX_PROMPT_LOGPROB_ROWS_PER_STEP
        # Decodes first, then unfinished prefills; each group in admission order (the sort is stable).
        for seq in sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            if budget == 0:
                break
            num_new = min(seq.num_uncomputed_tokens, budget)
            if seq.needs_prompt_logprobs:
                num_new = min(num_new, prompt_logprob_rows)
                if num_new == 0:
                    continue
            while not self.block_manager.allocate(seq, num_new):
                victim = preemption_victim(self.running, self.policy)
                budget += scheduled.pop(victim, 0)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled[seq] = num_new
                budget -= num_new
                if seq.needs_prompt_logprobs:
                    prompt_logprob_rows -= num_new
        # Admitting new work right after a preemption would only preempt again.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting.first_admissible()
            if seq is None:
                break
            prefix: list[int] = []
            if not seq.block_table:
                prefix = self.block_manager.match_prefix(seq)
            num_computed = seq.num_computed_tokens + len(prefix) * self.block_manager.block_size
            num_new = min(seq.num_tokens - num_computed, budget)
            if seq.needs_prompt_logprobs:
                num_new = min(num_new, prompt_logprob_rows)
                if num_new == 0:
                    break
            if not self.block_manager.can_admit(seq, prefix, num_new):
                break
            self.waiting.remove(seq)
            if not seq.block_table:
                out.prefix_cache_queries += seq.num_tokens
                out.prefix_cache_hits += num_computed
                self.block_manager.admit(seq, prefix)
                if seq.num_cached_tokens is None:
                    seq.num_cached_tokens = num_computed
            allocated = self.block_manager.allocate(seq, num_new)
            assert allocated, "can_admit() promised these blocks"
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled[seq] = num_new
            budget -= num_new
            if seq.needs_prompt_logprobs:
                prompt_logprob_rows -= num_new
        out.scheduled = list(scheduled.items())
        return out

    def finish_step(self, out: SchedulerOutput) -> None:
        """Marks the scheduled tokens as computed (their K/V is now in the cache) and registers full blocks."""
        for seq, num_new in out.scheduled:
            before = seq.num_computed_tokens
            seq.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(seq, before)

    def finish(self, seq: Sequence) -> None:
        """Removes ``seq`` (finished or aborted) from the queues and releases its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.put_back([seq])
