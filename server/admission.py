"""Admission of generation requests: a cap on concurrent ones (429), and draining on shutdown (503)."""
import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from server.errors import APIError

logger = logging.getLogger(__name__)

DRAIN_ABORT_GRACE_S = 5.0  # after aborting, how long requests get to send their final chunks


@dataclass(eq=False)
class Ticket:
    """One admitted request. When the drain deadline passes, ``abort`` aborts its engine requests."""

    num_sequences: int = 1  # n x prompts: what admission counts
    engine_requests: dict[str, Callable[[str], None]] = field(default_factory=dict)  # request id -> abort function
    aborted: bool = False

    def track(self, request_id: str, abort: Callable[[str], None]) -> None:
        if request_id in self.engine_requests:
            return
        self.engine_requests[request_id] = abort
        if self.aborted:
            abort(request_id)

    def abort(self) -> None:
        self.aborted = True
        for request_id, abort in self.engine_requests.items():
            abort(request_id)


class Admission:
    """Counts sequences (n x prompts of each request) against ``max_concurrent_requests``; a request larger than
    the cap on its own is admitted when nothing else is in flight."""

    def __init__(self, max_concurrent_requests: int) -> None:
        self.max_concurrent_requests = max_concurrent_requests
        self.in_flight: set[Ticket] = set()
        self.num_sequences = 0
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()

    def admit(self, num_sequences: int = 1) -> Ticket:
        if self.draining:
            raise APIError(
                503, "The server is shutting down and accepts no new requests.", code="server_draining",
                headers={"Retry-After": "5"},
            )
        if self.in_flight and self.num_sequences + num_sequences > self.max_concurrent_requests:
            raise APIError(
                429,
                f"The server is at its limit of {self.max_concurrent_requests} concurrent sequences (n x prompts "
                "of the requests in flight); retry shortly.",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        ticket = Ticket(num_sequences)
        self.in_flight.add(ticket)
        self.num_sequences += num_sequences
        self.idle.clear()
        return ticket

    def release(self, ticket: Ticket) -> None:
        if ticket in self.in_flight:
            self.in_flight.discard(ticket)
            self.num_sequences -= ticket.num_sequences
        if not self.in_flight:
            self.idle.set()

    async def drain(self, timeout: float) -> None:
        """Stops admitting, waits up to ``timeout`` for in-flight requests, then aborts the rest."""
        self.draining = True
        logger.info("draining: %d request(s) in flight, waiting up to %.1fs", len(self.in_flight), timeout)
        if await self.wait_idle(timeout):
            return
        logger.warning("drain deadline passed: aborting %d request(s)", len(self.in_flight))
        for ticket in list(self.in_flight):
            ticket.abort()
        if not await self.wait_idle(DRAIN_ABORT_GRACE_S):
            logger.error("%d request(s) still in flight after the abort grace period", len(self.in_flight))

    async def wait_idle(self, timeout: float) -> bool:
        if self.idle.is_set():
            return True
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
