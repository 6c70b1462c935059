"""POST /v1/messages and POST /v1/messages/count_tokens: Anthropic's Messages API over the chat pipeline.

A request is translated into the chat completions request (``translate.py``) and prepared by the chat route
(template, tools, grammar, sampling parameters, checks); the engine's outputs come back as Anthropic's message or
stream events. Responses carry ``request-id`` as Anthropic's do.
"""
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from scheduler.async_engine import AsyncEngine
from server.admission import Ticket
from server.anthropic.errors import error_type
from server.anthropic.message_output import content_blocks, message, stop_fields, usage
from server.anthropic.protocol import CountTokensRequest, MessagesRequest
from server.anthropic.stream_events import MessageEvents, event, ping_event
from server.anthropic.translate import conversation_request, generation_request
from server.errors import APIError
from server.generation import GenerationInput, generate
from server.request_log import RequestRecord
from server.serving import GenerationRoute, parse_body
from server.serving_chat import ChatCompletions
from server.state import ServerState
from server.streaming import GenerationStream
from server.tools import parse_tools


class Messages(GenerationRoute[MessagesRequest]):
    route = "/v1/messages"
    id_prefix = "msg"
    request_model = MessagesRequest

    def __init__(self, state: ServerState, chat: ChatCompletions) -> None:
        super().__init__(state)
        self.chat = chat

    def new_id(self) -> str:
        return f"msg_{uuid.uuid4().hex}"

    def num_sequences(self, body: MessagesRequest) -> int:
        return 1

    async def handle(self, request: Request) -> Response:
        response = await super().handle(request)
        response.headers["request-id"] = request.state.request_id
        return response

    async def count_tokens(self, request: Request) -> JSONResponse:
        """``{"input_tokens": N}``: the prompt a Messages request with this conversation and these tools gets."""
        body = await parse_body(request, CountTokensRequest)
        body.warn_unknown_fields("/v1/messages/count_tokens")
        self.state.check_model(body.model)
        self.state.ready_engine()
        chat = conversation_request(body)
        prompt = await self.state.tokenization.chat_prompt(
            chat.messages, chat.add_generation_prompt, chat.continue_final_message, parse_tools(chat).template_tools()
        )
        return JSONResponse({"input_tokens": len(prompt.token_ids)}, headers={"request-id": request.state.request_id})

    async def prepare(self, body: MessagesRequest, engine: AsyncEngine, record: RequestRecord) -> GenerationInput:
        return await self.chat.prepare(generation_request(body), engine, record)

    def stream_response(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> GenerationStream:
        return GenerationStream(events, on_close=on_close, headers={}, ping_message_factory=ping_event)

    def error_event(self, error: APIError) -> bytes:
        return event("error", {"error": {"type": error_type(error.status), "message": error.message}})

    async def stream(
        self, body: MessagesRequest, engine: AsyncEngine, generation: GenerationInput, ticket: Ticket,
        record: RequestRecord,
    ) -> AsyncIterator[bytes]:
        events = MessageEvents(parse_tools(generation_request(body)))
        cached_tokens = 0
        finish_reason, matched_stop = None, None
        started = False
        async for update in generate(engine, generation, ticket):
            chunk = b""
            if not started:  # the first output says how much of the prompt the prefix cache held
                started = True
                cached_tokens = update.num_cached_tokens
                start_usage = usage(record.prompt_tokens, 0, cached_tokens)
                chunk += events.start(message(record.completion_id, body.model, [], (None, None), start_usage))
            for delta in update.deltas:
                record.saw_tokens(len(delta.token_ids))
                chunk += events.feed(delta.text)
                if delta.finish_reason is not None:
                    record.finish_reasons.append(delta.finish_reason)
                    finish_reason, matched_stop = delta.finish_reason, delta.stop_reason
            if chunk:
                yield chunk
        rest = events.flush()
        stop = stop_fields(finish_reason, matched_stop, events.called_tools, body.stop_sequences)
        yield rest + events.end(stop, usage(record.prompt_tokens, record.completion_tokens, cached_tokens))

    async def collect(
        self, body: MessagesRequest, engine: AsyncEngine, generation: GenerationInput, ticket: Ticket,
        record: RequestRecord,
    ) -> dict:
        texts: list[str] = []
        cached_tokens = 0
        finish_reason, matched_stop = None, None
        async for update in generate(engine, generation, ticket):
            cached_tokens = update.num_cached_tokens
            for delta in update.deltas:
                record.saw_tokens(len(delta.token_ids))
                texts.append(delta.text)
                if delta.finish_reason is not None:
                    record.finish_reasons.append(delta.finish_reason)
                    finish_reason, matched_stop = delta.finish_reason, delta.stop_reason
        content = content_blocks("".join(texts), parse_tools(generation_request(body)))
        called_tools = any(block["type"] == "tool_use" for block in content)
        stop = stop_fields(finish_reason, matched_stop, called_tools, body.stop_sequences)
        return message(record.completion_id, body.model, content, stop,
                       usage(record.prompt_tokens, record.completion_tokens, cached_tokens))
