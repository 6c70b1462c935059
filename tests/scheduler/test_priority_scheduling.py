"""The priority scheduling policy: admission by (priority, arrival), preemption of the lowest priority; fcfs as
before."""
import pytest

from sched_helpers import make_seq
from scheduler.block_manager import BlockManager
from scheduler.scheduler import Scheduler
from scheduler.sequence import Sequence, SequenceStatus
from scheduler.waiting_queue import WaitingQueue

BS = 4


def make_scheduler(policy: str, num_blocks: int = 64, max_num_seqs: int = 8) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, True), max_num_seqs, 64, policy)


def prioritised(priority: int, base: int, length: int = 7) -> Sequence:
    seq = make_seq([base + i for i in range(length)])
    seq.priority = priority
    return seq


def step(scheduler: Scheduler, next_token: int = 7) -> list[Sequence]:
    out = scheduler.schedule()
    scheduler.finish_step(out)
    for seq, _ in out.scheduled:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(next_token)
    return out.preempted


def test_a_full_batch_admits_the_lowest_priority_value_first_then_by_arrival() -> None:
    scheduler = make_scheduler("priority", max_num_seqs=1)
    running = prioritised(5, 0)
    scheduler.add(running)
    step(scheduler)
    low_early, low_late = prioritised(9, 100), prioritised(9, 200)
    high, mid = prioritised(-1, 300), prioritised(3, 400)
    for seq in (low_early, low_late, high, mid):
        scheduler.add(seq)
    assert list(scheduler.waiting) == [high, mid, low_early, low_late]
    scheduler.finish(running)
    order = []
    while scheduler.waiting:
        step(scheduler)
        order.append(scheduler.running[0])
        scheduler.finish(scheduler.running[0])
    assert order == [high, mid, low_early, low_late]


def test_fcfs_ignores_priority() -> None:
    scheduler = make_scheduler("fcfs", max_num_seqs=1)
    first, second = prioritised(9, 0), prioritised(-9, 100)
    scheduler.add(first)
    scheduler.add(second)
    step(scheduler)
    assert scheduler.running == [first]


@pytest.mark.parametrize(("policy", "expected_victim"), [("priority", "low"), ("fcfs", "latest")])
def test_preemption_takes_the_lowest_priority_under_the_priority_policy(policy: str, expected_victim: str) -> None:
    scheduler = make_scheduler(policy, num_blocks=6)
    low, high_a, high_b = prioritised(7, 100), prioritised(0, 200), prioritised(0, 300)
    for seq in (low, high_a, high_b):  # admitted in this order: the fcfs victim is high_b
        scheduler.add(seq)
    step(scheduler, next_token=1)  # three prompts of 7 tokens, 2 blocks each: the pool is full
    step(scheduler, next_token=2)
    preempted = step(scheduler, next_token=3)  # each needs a third block
    victim = {"low": low, "latest": high_b}[expected_victim]
    assert preempted[0] is victim
    assert victim.status is SequenceStatus.WAITING and victim.block_table == []


def test_a_preempted_sequence_keeps_its_place_among_waiting_priorities() -> None:
    queue = WaitingQueue("priority")
    urgent, preempted, late = prioritised(0, 0), prioritised(5, 100), prioritised(5, 200)
    urgent.arrival_order, preempted.arrival_order, late.arrival_order = 2, 0, 3
    queue.add(urgent)
    queue.add(late)
    queue.put_back([preempted])
    assert list(queue) == [urgent, preempted, late]
    assert queue.first_admissible() is urgent
    queue.remove(urgent)
    assert queue.first_admissible() is preempted and len(queue) == 2
    preempted.grammar_pending = True  # passed over, but keeps its place
    assert queue.first_admissible() is late and list(queue) == [preempted, late]


def test_forked_choices_inherit_priority_and_arrival_and_go_ahead_of_equals() -> None:
    scheduler = make_scheduler("priority", max_num_seqs=1)
    parent, other = prioritised(1, 0), prioritised(1, 100)
    scheduler.add(parent)
    scheduler.add(other)
    step(scheduler)
    child_a, child_b = make_seq(list(parent.token_ids)), make_seq(list(parent.token_ids))
    scheduler.add_forks(parent, [child_a, child_b])
    assert (child_a.priority, child_a.arrival_order) == (parent.priority, parent.arrival_order)
    assert list(scheduler.waiting) == [child_a, child_b, other]


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="fcfs, priority"):
        WaitingQueue("lifo")  # type: ignore[arg-type]
