"""Runs one API request in the engine: one engine request per prompt; several prompts' streams are merged.

A drain abort goes through the engine (``engine.abort``), which ends the unfinished choices with finish reason
``abort`` in a last output, so every path ends the same way: with the engine's final output.
"""
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from scheduler.async_engine import AsyncEngine
from scheduler.outputs import CompletionDelta, EngineDeadError, RequestOutput, RequestRejected, TokenLogprob
from scheduler.sampling_params import InvalidParameterError, SamplingParams
from server.admission import Ticket
from server.errors import APIError, from_engine_error
from server.tokenization import PromptInput

ENGINE_ERRORS = (RequestRejected, InvalidParameterError, EngineDeadError)
FINISHED = object()  # queue marker: one prompt's engine stream ended


@dataclass
class PromptUpdate:
    """What one engine output brought for one prompt; choice indices are global across prompts."""

    prompt_index: int
    deltas: list[CompletionDelta]
    prompt_logprobs: list[TokenLogprob | None] | None
    num_cached_tokens: int


@dataclass
class GenerationInput:
    request_id: str
    prompts: list[PromptInput]
    params: list[SamplingParams]  # one per prompt, resolved by engine.check_request (max_tokens depends on the prompt)
    arrival_time: float
    priority: int = 0

    def engine_request_id(self, prompt_index: int) -> str:
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{prompt_index}"


def to_update(prompt_index: int, n: int, output: RequestOutput) -> PromptUpdate:
    if output.error is not None:
        raise APIError(500, f"The engine failed this request: {output.error}", code="engine_error")
    if prompt_index:
        for delta in output.outputs:
            delta.index += prompt_index * n
    return PromptUpdate(prompt_index, output.outputs, output.prompt_logprobs, output.num_cached_tokens)


async def prompt_updates(
    engine: AsyncEngine, generation: GenerationInput, prompt_index: int, ticket: Ticket
) -> AsyncIterator[PromptUpdate]:
    """One prompt's updates. Leaving early (client gone) closes the engine stream, which aborts the request."""
    request_id = generation.engine_request_id(prompt_index)
    params = generation.params[prompt_index]
    try:
        stream = engine.add_request(request_id, generation.prompts[prompt_index].token_ids, params,
                                    generation.arrival_time, generation.priority, checked=True)
    except ENGINE_ERRORS as error:
        raise from_engine_error(error) from error
    # The core gets an abort after the request itself (one channel, in order), so a drain abort reaches a request
    # still waiting in the engine's queue too.
    ticket.track(request_id, engine.abort)
    try:
        async for output in stream:
            yield to_update(prompt_index, params.n, output)
    except ENGINE_ERRORS as error:
        raise from_engine_error(error) from error
    finally:
        stream.close()


async def pump(updates: AsyncIterator[PromptUpdate], queue: asyncio.Queue) -> None:
    try:
        async for update in updates:
            queue.put_nowait(update)
        queue.put_nowait(FINISHED)
    except Exception as error:  # raised again by the consumer
        queue.put_nowait(error)


def generate(engine: AsyncEngine, generation: GenerationInput, ticket: Ticket) -> AsyncIterator[PromptUpdate]:
    """Updates of every prompt until all their choices finished."""
    if len(generation.prompts) == 1:
        return prompt_updates(engine, generation, 0, ticket)
    return merged_updates(engine, generation, ticket)


async def merged_updates(
    engine: AsyncEngine, generation: GenerationInput, ticket: Ticket
) -> AsyncIterator[PromptUpdate]:
    queue: asyncio.Queue = asyncio.Queue()
    pumps = [
        asyncio.create_task(pump(prompt_updates(engine, generation, index, ticket), queue))
        for index in range(len(generation.prompts))
    ]
    running = len(pumps)
    try:
        while running:
            item = await queue.get()
            if item is FINISHED:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
