"""POST /v1/responses: a response generated on the chat pipeline, answered whole or as Responses stream events."""
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from scheduler.async_engine import AsyncEngine
from scheduler.sampling_params import SamplingParams
from server.admission import Ticket
from server.errors import APIError, invalid_request
from server.generation import GenerationInput, generate
from server.protocol.chat import ChatMessage
from server.request_log import RequestRecord
from server.responses.conversation import input_messages, output_messages
from server.responses.events import EventEncoder
from server.responses.output_items import OutputItems
from server.responses.prompt import response_prompt
from server.responses.protocol import ResponsesRequest
from server.responses.response_object import response_error, response_object, response_usage
from server.responses.store import ResponseStore, StoredResponse
from server.responses.tools import response_tool_setup, text_format_spec
from server.sampling import check_prompts
from server.serving import GenerationRoute
from server.state import ServerState
from server.tools import ToolSetup, answer_constraint

logger = logging.getLogger(__name__)

TERMINAL_EVENTS = {"completed": "response.completed", "incomplete": "response.incomplete",
                   "failed": "response.failed"}


@dataclass
class ResponseGeneration(GenerationInput):
    tools: ToolSetup = field(default_factory=ToolSetup)
    conversation: list[ChatMessage] = field(default_factory=list)  # without the instructions
    created_at: int = 0


@dataclass
class Outcome:
    """How the generation ended: the engine's finish reason, or an error."""

    finish_reason: str | None = None
    cached_tokens: int = 0
    error: APIError | None = None


class Responses(GenerationRoute[ResponsesRequest]):
    route = "/v1/responses"
    id_prefix = "resp"
    request_model = ResponsesRequest

    def __init__(self, state: ServerState) -> None:
        super().__init__(state)
        self.store = ResponseStore(state.config.responses_store_size)

    def num_sequences(self, body: ResponsesRequest) -> int:
        return 1

    def new_id(self) -> str:
        return f"{self.id_prefix}_{uuid.uuid4().hex}"

    async def prepare(self, body: ResponsesRequest, engine: AsyncEngine, record: RequestRecord) -> ResponseGeneration:
        if body.background:
            raise invalid_request("background responses are not supported; send the request without it",
                                  param="background")
        tools = response_tool_setup(body)
        constraint = await answer_constraint(text_format_spec(body.text), "text.format", tools,
                                             engine.grammar_validator)
        history = []
        if body.previous_response_id is not None:
            history = self.store.get(body.previous_response_id, "previous_response_id").conversation
        conversation = history + input_messages(body.input)
        params = SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                max_tokens=body.max_output_tokens, stop=body.stop_strings,
                                structured_output=constraint)
        prompt = await response_prompt(self.state.tokenization, body.instructions, conversation, tools,
                                       body.truncation == "auto", engine.max_model_len, body.max_output_tokens or 1)
        [params] = check_prompts(engine, [prompt.token_ids], params,
                                 {"max_tokens": "max_output_tokens", "prompt": "input"})
        record.prompt_tokens = len(prompt.token_ids)
        record.prompt_text = prompt.text
        return ResponseGeneration(record.completion_id, [prompt], [params], record.arrival_time,
                                  self.state.check_priority(body.priority), tools=tools, conversation=conversation,
                                  created_at=int(time.time()))

    def response(self, body: ResponsesRequest, generation: ResponseGeneration, status: str, output: list[dict],
                 **details: object) -> dict:
        return response_object(body, generation.request_id, self.config.model_name, generation.created_at,
                               body.store and self.store.enabled, status, output, **details)

    async def run(
        self, engine: AsyncEngine, generation: ResponseGeneration, ticket: Ticket, record: RequestRecord,
        output: OutputItems, outcome: Outcome,
    ) -> AsyncIterator[list[bytes]]:
        """The events of each engine update; an engine failure ends it and is kept in ``outcome``."""
        try:
            async for update in generate(engine, generation, ticket):
                outcome.cached_tokens = update.num_cached_tokens
                events = []
                for delta in update.deltas:
                    record.saw_tokens(len(delta.token_ids))
                    events += output.feed(delta.text)
                    if delta.finish_reason is not None:
                        outcome.finish_reason = delta.finish_reason
                        record.finish_reasons.append(delta.finish_reason)
                yield events
        except APIError as error:
            outcome.error = error
        except Exception:
            logger.exception("%s failed while generating", record.completion_id)
            outcome.error = APIError(500, "Internal server error while generating.")

    def conclude(
        self, body: ResponsesRequest, generation: ResponseGeneration, record: RequestRecord, output: OutputItems,
        outcome: Outcome,
    ) -> tuple[list[bytes], dict]:
        """The events closing the open output items, and the final response (stored when asked)."""
        error = None
        if outcome.error is not None:
            record.outcome = "error"
            error = response_error(outcome.error.code, outcome.error.message)
        elif outcome.finish_reason == "abort":
            error = response_error("server_error", "The server aborted the response (it is shutting down).")
        status = "failed" if error else "incomplete" if outcome.finish_reason == "length" else "completed"
        closing = output.finish("completed" if status == "completed" else "incomplete")
        usage = response_usage(record.prompt_tokens, record.completion_tokens, outcome.cached_tokens)
        response = self.response(body, generation, status, output.items, usage=usage, error=error)
        if body.store:
            self.store.put(StoredResponse(response, generation.conversation + output_messages(output.items)))
        return closing, response

    async def stream(
        self, body: ResponsesRequest, engine: AsyncEngine, generation: ResponseGeneration, ticket: Ticket,
        record: RequestRecord,
    ) -> AsyncIterator[bytes]:
        events = EventEncoder()
        started = self.response(body, generation, "in_progress", [])
        yield events.event("response.created", response=started) + events.event("response.in_progress",
                                                                                 response=started)
        output = OutputItems(generation.tools, events)
        outcome = Outcome()
        async for update_events in self.run(engine, generation, ticket, record, output, outcome):
            if update_events:
                yield b"".join(update_events)
        closing, response = self.conclude(body, generation, record, output, outcome)
        yield b"".join(closing) + events.event(TERMINAL_EVENTS[response["status"]], response=response)

    async def collect(
        self, body: ResponsesRequest, engine: AsyncEngine, generation: ResponseGeneration, ticket: Ticket,
        record: RequestRecord,
    ) -> dict:
        output = OutputItems(generation.tools, EventEncoder())
        outcome = Outcome()
        async for _ in self.run(engine, generation, ticket, record, output, outcome):
            pass
        if outcome.error is not None:
            raise outcome.error
        return self.conclude(body, generation, record, output, outcome)[1]
