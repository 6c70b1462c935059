"""The path every generation request takes: parse, check, admit, prepare, then stream (SSE) or collect (JSON)."""
import asyncio
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from scheduler.async_engine import AsyncEngine
from server.admission import Ticket
from server.errors import APIError, from_validation_error
from server.generation import GenerationInput
from server.protocol.common import OpenAIRequest
from server.request_log import RequestRecord
from server.state import ServerState
from server.streaming import DONE_EVENT, ClientDisconnected, GenerationStream, sse_event, until_disconnected

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT", bound=OpenAIRequest)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"; only metrics ever see it


async def parse_body(request: Request, model: type[RequestT]) -> RequestT:
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        raise from_validation_error(error) from None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class GenerationRoute(ABC, Generic[RequestT]):
    route: str
    id_prefix: str
    request_model: type[RequestT]

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.config = state.config

    def num_sequences(self, body: RequestT) -> int:
        """What admission counts: n choices of each prompt (chat and completions requests have ``n``)."""
        return body.n

    def new_id(self) -> str:
        return f"{self.id_prefix}-{uuid.uuid4().hex}"

    @abstractmethod
    async def prepare(self, body: RequestT, engine: AsyncEngine, record: RequestRecord) -> GenerationInput:
        """Tokenizes and builds the engine parameters; raises APIError for anything invalid."""

    @abstractmethod
    def stream(
        self, body: RequestT, engine: AsyncEngine, generation: GenerationInput, ticket: Ticket, record: RequestRecord
    ) -> AsyncIterator[bytes]:
        """SSE events, ending with ``data: [DONE]``."""

    @abstractmethod
    async def collect(
        self, body: RequestT, engine: AsyncEngine, generation: GenerationInput, ticket: Ticket, record: RequestRecord
    ) -> dict:
        """The whole response body."""

    async def handle(self, request: Request) -> Response:
        arrival_time = time.monotonic()
        try:
            body = await parse_body(request, self.request_model)
            body.warn_unknown_fields(self.route)
            self.state.check_model(body.model)
            engine = self.state.ready_engine()
            ticket = self.state.admission.admit(self.num_sequences(body))
        except APIError as error:
            self.state.metrics.record_rejected(error.code or error.type)
            raise
        record = RequestRecord(
            completion_id=self.new_id(),
            request_id=request.state.request_id,
            route=self.route,
            arrival_time=arrival_time,
        )
        streaming = False
        try:
            generation = await self.prepare(body, engine, record)
            if body.stream:
                events = self.guard_stream(self.stream(body, engine, generation, ticket, record), record)
                response = self.stream_response(events, on_close=lambda: self.finish(ticket, record))
                streaming = True
                return response
            payload = await until_disconnected(request, self.collect(body, engine, generation, ticket, record))
            return JSONResponse(payload)
        except ClientDisconnected:
            record.outcome = "disconnected"
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except APIError as error:
            record.outcome = "error"
            self.state.metrics.record_rejected(error.code or error.type)
            raise
        except asyncio.CancelledError:
            record.outcome = "disconnected"
            raise
        except Exception:
            record.outcome = "error"
            raise
        finally:
            if not streaming:
                self.finish(ticket, record)

    def stream_response(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> GenerationStream:
        return GenerationStream(events, on_close=on_close, headers={})

    def error_event(self, error: APIError) -> bytes:
        """The last event of a stream that failed after it started: the error object, then [DONE]."""
        return sse_event(error.body()) + DONE_EVENT

    async def guard_stream(self, events: AsyncIterator[bytes], record: RequestRecord) -> AsyncIterator[bytes]:
        """Once the stream has started, errors travel as an SSE event (``error_event``)."""
        try:
            async for event in events:
                yield event
        except APIError as error:
            record.outcome = "error"
            self.state.metrics.record_rejected(error.code or error.type)
            yield self.error_event(error)
        except Exception:
            logger.exception("%s failed while streaming", record.completion_id)
            record.outcome = "error"
            yield self.error_event(APIError(500, "Internal server error while streaming."))
        except BaseException:  # cancelled or closed: the client went away
            record.outcome = "disconnected"
            raise

    def finish(self, ticket: Ticket, record: RequestRecord) -> None:
        self.state.admission.release(ticket)
        record.log(self.config.log_prompts)
