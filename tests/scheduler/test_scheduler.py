"""Scheduling under token/sequence budgets, chunked prefill, prefix hits, preemption, abort, and no block leaks."""
import random

from sched_helpers import make_seq
from scheduler.block_manager import BlockManager
from scheduler.scheduler import MAX_PROMPT_LOGPROB_ROWS_PER_STEP, Scheduler, SchedulerOutput
from scheduler.sequence import Sequence, SequenceStatus

BS = 4


def make_scheduler(num_blocks: int = 64, max_num_seqs: int = 8, max_tokens: int = 64, caching: bool = True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, caching), max_num_seqs, max_tokens)


def run_step(scheduler: Scheduler, next_token: int = 7) -> SchedulerOutput:
    """One engine step without a model: the computed sequences that reached their end get ``next_token``."""
    out = scheduler.schedule()
    assert out.num_tokens <= scheduler.max_num_batched_tokens
    assert len(scheduler.running) <= scheduler.max_num_seqs
    scheduler.finish_step(out)
    for seq, _ in out.scheduled:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(next_token)
    return out


def finish_if_done(scheduler: Scheduler, seq: Sequence) -> None:
    if seq.status is SequenceStatus.RUNNING and seq.num_output_tokens >= seq.params.max_tokens:
        scheduler.finish(seq)


def test_token_budget_is_respected_and_the_last_prefill_is_chunked() -> None:
    scheduler = make_scheduler(max_tokens=64)
    a, b = make_seq(list(range(100))), make_seq(list(range(500, 530)))
    scheduler.add(a)
    scheduler.add(b)
    assert [(s, n) for s, n in run_step(scheduler).scheduled] == [(a, 64)]
    assert [(s, n) for s, n in run_step(scheduler).scheduled] == [(a, 36), (b, 28)]
    assert a.num_output_tokens == 1 and b.num_output_tokens == 0
    assert [(s, n) for s, n in run_step(scheduler).scheduled] == [(a, 1), (b, 2)]
    assert b.num_output_tokens == 1


def test_a_long_prompt_never_stalls_running_decodes() -> None:
    scheduler = make_scheduler(max_tokens=16)
    decoder = make_seq([1, 2, 3])
    scheduler.add(decoder)
    run_step(scheduler)
    long_prompt = make_seq(list(range(100, 200)))
    scheduler.add(long_prompt)
    for _ in range(6):
        out = run_step(scheduler)
        assert out.scheduled[0] == (decoder, 1)
        assert out.scheduled[1] == (long_prompt, 15)
    assert decoder.num_output_tokens == 7


def test_max_num_seqs_limits_running_sequences() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    seqs = [make_seq([i, i + 1]) for i in range(5)]
    for seq in seqs:
        scheduler.add(seq)
    out = run_step(scheduler)
    assert [s for s, _ in out.scheduled] == seqs[:2]
    assert len(scheduler.waiting) == 3
    scheduler.finish(seqs[0])
    assert [s for s, _ in run_step(scheduler).scheduled] == [seqs[1], seqs[2]]


def test_prefix_hits_skip_computation_and_are_counted() -> None:
    scheduler = make_scheduler()
    shared = list(range(40, 52))  # three full blocks
    first = make_seq(shared + [1, 2])
    scheduler.add(first)
    out = run_step(scheduler)
    assert (out.prefix_cache_queries, out.prefix_cache_hits) == (14, 0)
    second = make_seq(shared + [3])
    scheduler.add(second)
    out = run_step(scheduler)
    assert (second, 1) in out.scheduled
    assert (out.prefix_cache_queries, out.prefix_cache_hits) == (13, 12)
    assert second.num_cached_tokens == 12 and first.num_cached_tokens == 0
    assert second.block_table[:3] == first.block_table[:3]


def test_the_most_recently_admitted_sequence_is_preempted_and_resumes_without_losing_output() -> None:
    scheduler = make_scheduler(num_blocks=6)
    a, b, c = (make_seq([base + i for i in range(7)]) for base in (100, 200, 300))
    for seq in (a, b, c):
        scheduler.add(seq)
    run_step(scheduler, next_token=1)  # all three prompts computed: 2 blocks each, pool full
    run_step(scheduler, next_token=2)  # token 8 still fits in each second block
    assert scheduler.block_manager.num_free_blocks == 0
    out = run_step(scheduler, next_token=3)  # each now needs a third block
    assert out.preempted == [c]
    assert c.status is SequenceStatus.WAITING and c.block_table == [] and c.num_computed_tokens == 0
    assert list(scheduler.waiting) == [c]
    assert c.output_token_ids == [1, 2]
    scheduler.finish(a)
    out = run_step(scheduler, next_token=4)
    assert (c, 9) in out.scheduled  # prompt and both earlier outputs, recomputed
    assert c.output_token_ids == [1, 2, 4]


def test_preemption_always_makes_progress_with_a_tiny_pool() -> None:
    scheduler = make_scheduler(num_blocks=4)  # one sequence of 16 tokens fills the pool
    seqs = [make_seq([base + i for i in range(8)], max_tokens=8) for base in (0, 100, 200)]
    for seq in seqs:
        scheduler.add(seq)
    preemptions = 0
    for _ in range(200):
        if not scheduler.has_unfinished():
            break
        preemptions += len(run_step(scheduler).preempted)
        for seq in seqs:
            finish_if_done(scheduler, seq)
    assert not scheduler.has_unfinished()
    assert preemptions > 0
    assert all(seq.num_output_tokens == 8 for seq in seqs)
    assert scheduler.block_manager.num_free_blocks == 4


def test_finishing_running_and_waiting_sequences_frees_their_blocks() -> None:
    scheduler = make_scheduler(num_blocks=8, max_num_seqs=1)
    running, waiting = make_seq(list(range(10))), make_seq(list(range(10)))
    scheduler.add(running)
    scheduler.add(waiting)
    run_step(scheduler)
    assert scheduler.block_manager.num_free_blocks == 5
    scheduler.finish(waiting)
    scheduler.finish(running)
    assert not scheduler.has_unfinished()
    assert scheduler.block_manager.num_free_blocks == 8
    assert running.is_finished and waiting.is_finished


def check_invariants(scheduler: Scheduler, live: list[Sequence]) -> None:
    manager = scheduler.block_manager
    refs = [0] * manager.num_blocks
    for seq in live:
        for block_id in seq.block_table:
            refs[block_id] += 1
        if seq.status is SequenceStatus.RUNNING:
            assert len(seq.block_table) == manager.blocks_for(seq.num_computed_tokens) or seq.num_computed_tokens == 0
    assert refs == [block.ref_count for block in manager.blocks]
    assert manager.num_free_blocks == sum(1 for r in refs if r == 0)


def test_thousands_of_random_admit_abort_finish_events_leak_no_block() -> None:
    rng = random.Random(1234)
    scheduler = make_scheduler(num_blocks=48, max_num_seqs=6, max_tokens=40)
    prefixes = [[rng.randrange(1000) for _ in range(rng.choice([4, 8, 12]))] for _ in range(5)]
    live: list[Sequence] = []
    preemptions = hits = 0
    for _ in range(3000):
        event = rng.random()
        if event < 0.25 and len(live) < 20:
            prompt = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 30))]
            seq = make_seq(prompt, max_tokens=rng.randrange(1, 24))
            scheduler.add(seq)
            live.append(seq)
        elif event < 0.32 and live:
            seq = live.pop(rng.randrange(len(live)))
            scheduler.finish(seq)
        else:
            out = run_step(scheduler, next_token=rng.randrange(1000))
            preemptions += len(out.preempted)
            hits += out.prefix_cache_hits
            for seq in list(live):
                if seq.status is SequenceStatus.RUNNING and seq.num_output_tokens >= seq.params.max_tokens:
                    scheduler.finish(seq)
                    live.remove(seq)
        check_invariants(scheduler, live)
    for seq in live:
        scheduler.finish(seq)
    assert not scheduler.has_unfinished()
    assert scheduler.block_manager.num_free_blocks == 48
    assert all(block.ref_count == 0 for block in scheduler.block_manager.blocks)
    assert preemptions > 0 and hits > 0  # the random walk did exercise both paths


def test_prompt_logprob_rows_per_step_are_capped_across_sequences() -> None:
    scheduler = make_scheduler(num_blocks=1024, max_tokens=4096)
    first, second = make_seq(list(range(600))), make_seq(list(range(300)))
    plain = make_seq(list(range(1000, 1100)))
    for seq in (first, second):
        seq.needs_prompt_logprobs = True
    for seq in (first, second, plain):
        scheduler.add(seq)
    out = run_step(scheduler)
    assert [(s, n) for s, n in out.scheduled] == [(first, MAX_PROMPT_LOGPROB_ROWS_PER_STEP)]
    out = run_step(scheduler)
    assert [(s, n) for s, n in out.scheduled] == [(first, 600 - MAX_PROMPT_LOGPROB_ROWS_PER_STEP), (second, 300),
                                                  (plain, 100)]


def test_a_sequence_waiting_for_its_grammar_is_passed_over_and_keeps_its_place() -> None:
    scheduler = make_scheduler(max_tokens=64)
    compiling, plain, later = make_seq(list(range(10))), make_seq(list(range(20, 30))), make_seq(list(range(40, 50)))
    compiling.grammar_pending = True
    for seq in (compiling, plain, later):
        scheduler.add(seq)
    assert [seq for seq, _ in run_step(scheduler).scheduled] == [plain, later]
    assert compiling.status is SequenceStatus.WAITING and compiling.block_table == []
    assert list(scheduler.waiting) == [compiling]
    compiling.grammar_pending = False
    assert [seq for seq, _ in run_step(scheduler).scheduled] == [plain, later, compiling]
