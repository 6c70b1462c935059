"""The queue of sequences waiting to run, in the order the scheduling policy admits them.

``fcfs``: arrival order; sequences put back (preempted, or choices forked from a computed prompt) go first.
``priority``: lowest ``priority`` value first (as vLLM), ties by arrival; sequences put back keep their own place,
so a preempted low-priority sequence does not jump ahead of waiting high-priority ones.
Sequences whose grammar is still compiling keep their place but are passed over (``first_admissible``).
"""
import bisect
from collections import deque
from collections.abc import Iterator
from typing import Literal

from scheduler.sequence import Sequence

SchedulingPolicy = Literal["fcfs", "priority"]
SCHEDULING_POLICIES: tuple[SchedulingPolicy, ...] = ("fcfs", "priority")


def priority_key(seq: Sequence) -> tuple[int, int]:
    return seq.priority, seq.arrival_order


class WaitingQueue:
    def __init__(self, policy: SchedulingPolicy) -> None:
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(SCHEDULING_POLICIES)}, not {policy!r}")
        self.policy = policy
        self._fcfs: deque[Sequence] = deque()
        self._by_priority: list[Sequence] = []  # sorted by priority_key; stable among equal keys

    def add(self, seq: Sequence) -> None:
        """A new sequence, after every waiting one of its priority."""
        if self.policy == "fcfs":
            self._fcfs.append(seq)
        else:
            bisect.insort_right(self._by_priority, seq, key=priority_key)

    def put_back(self, seqs: list[Sequence]) -> None:
        """Sequences that ran or belong to a running request, in their given order."""
        if self.policy == "fcfs":
            self._fcfs.extendleft(reversed(seqs))
        else:
            for seq in reversed(seqs):  # ahead of equal keys, keeping the given order among themselves
                bisect.insort_left(self._by_priority, seq, key=priority_key)

    def first_admissible(self) -> Sequence | None:
        """The first sequence in policy order that may run now (its grammar, if any, is compiled)."""
        return next((seq for seq in self if not seq.grammar_pending), None)

    def remove(self, seq: Sequence) -> None:
        (self._fcfs if self.policy == "fcfs" else self._by_priority).remove(seq)

    def __contains__(self, seq: Sequence) -> bool:
        return any(waiting is seq for waiting in self)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._fcfs if self.policy == "fcfs" else self._by_priority)

    def __len__(self) -> int:
        return len(self._fcfs) if self.policy == "fcfs" else len(self._by_priority)


def preemption_victim(running: list[Sequence], policy: SchedulingPolicy) -> Sequence:
    """``fcfs``: the most recently admitted; ``priority``: the lowest priority, the latest arrival among equals."""
    if policy == "fcfs":
        return running[-1]
    return max(reversed(running), key=priority_key)  # reversed: among equal keys, the most recently admitted
