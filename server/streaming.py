"""Server-sent events: encoding, the SSE response that releases its admission ticket, client disconnects."""
import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

T = TypeVar("T")
DONE_EVENT = b"data: [DONE]\n\n"
PING_INTERVAL_S = 15.0


def encode_json(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def sse_event(payload: Any) -> bytes:
    return b"data: " + encode_json(payload) + b"\n\n"


class ChunkEncoder:
    """SSE events of one response whose chunks share their leading fields (id, object, created, model): those are
    encoded once, each chunk then adds only its choice (and usage)."""

    def __init__(self, header: dict[str, Any], with_usage: bool) -> None:
        self.prefix = b"data: " + encode_json(header)[:-1] + b',"choices":['
        self.with_usage = with_usage

    def event(
        self, choice: dict[str, Any] | None, usage: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
    ) -> bytes:
        """One chunk with ``choice`` (or none); ``usage`` goes in (null when None) only if the response has usage;
        ``extra`` adds top-level fields."""
        body = self.prefix + (encode_json(choice) if choice is not None else b"") + b"]"
        if self.with_usage:
            body += b',"usage":' + encode_json(usage)
        if extra:
            body += b"," + encode_json(extra)[1:-1]
        return body + b"}\n\n"


class GenerationStream(EventSourceResponse):
    """An SSE response that runs ``on_close`` however it ends (done, client gone, cancelled, never started)."""

    def __init__(
        self, events: AsyncIterator[bytes], on_close: Callable[[], None], headers: dict[str, str],
        ping_message_factory: Callable[[], ServerSentEvent] | None = None,
    ) -> None:
        super().__init__(events, headers=headers, sep="\n", ping=PING_INTERVAL_S,
                         ping_message_factory=ping_message_factory)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        # sse-starlette opens an anyio cancel scope around every send even without a send timeout (we set none);
        # at one event per token that scope was a fifth of the event loop's time per streamed token.
        await send(message)


class ClientDisconnected(Exception):
    """The client went away before a non-streaming response was ready."""


async def wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs ``work``; if the client disconnects first, cancels it (which aborts its engine requests)."""
    work_task = asyncio.ensure_future(work)
    disconnect_task = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect_task.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.gather(work_task, return_exceptions=True)
    if work_task.cancelled():
        raise ClientDisconnected()
    return work_task.result()
