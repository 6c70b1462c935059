"""Runs one API request in the engine: one engine request per prompt, their outputs merged into one stream.

Every prompt's engine stream is pumped by its own task into one queue, so that the consumer can also be woken
by a drain abort, and so that outputs that piled up while the client was slow go out as one chunk.
"""
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from scheduler.async_engine import AsyncEngine
from scheduler.outputs import CompletionDelta, RequestOutput, TokenLogprob
from scheduler.sampling_params import SamplingParams
from server.admission import Ticket
from server.errors import APIError, from_engine_error
from server.tokenization import PromptInput

ABORTED = object()  # queue marker: the drain deadline passed
FINISHED = object()  # queue marker: one prompt's engine stream ended


@dataclass
class PromptUpdate:
    """What arrived for one prompt since the previous update; choice indices are global across prompts."""

    prompt_index: int
    deltas: list[CompletionDelta]
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int | None = None
    error: str | None = None


@dataclass
class GenerationInput:
    request_id: str
    prompts: list[PromptInput]
    params: list[SamplingParams]  # one per prompt (max_tokens depends on the prompt length)
    arrival_time: float


@dataclass
class ChoiceProgress:
    unfinished: set[int] = field(default_factory=set)

    def record(self, delta: CompletionDelta) -> None:
        if delta.finish_reason is not None:
            self.unfinished.discard(delta.index)


def merge_deltas(first: CompletionDelta, second: CompletionDelta) -> CompletionDelta:
    logprobs = None
    if first.logprobs is not None or second.logprobs is not None:
        logprobs = (first.logprobs or []) + (second.logprobs or [])
    return CompletionDelta(
        index=first.index,
        text=first.text + second.text,
        token_ids=first.token_ids + second.token_ids,
        logprobs=logprobs,
        finish_reason=second.finish_reason,
        stop_reason=second.stop_reason,
    )


def to_update(prompt_index: int, n: int, output: RequestOutput) -> PromptUpdate:
    deltas = [
        CompletionDelta(
            index=prompt_index * n + delta.index,
            text=delta.text,
            token_ids=delta.token_ids,
            logprobs=delta.logprobs,
            finish_reason=delta.finish_reason,
            stop_reason=delta.stop_reason,
        )
        for delta in output.outputs
    ]
    return PromptUpdate(
        prompt_index=prompt_index,
        deltas=deltas,
        prompt_logprobs=output.prompt_logprobs,
        num_cached_tokens=output.num_cached_tokens,
        error=output.error,
    )


def coalesce(updates: list[PromptUpdate]) -> list[PromptUpdate]:
    """Merges consecutive updates of the same prompt: one chunk per choice instead of one per engine step."""
    merged: dict[int, PromptUpdate] = {}
    for update in updates:
        current = merged.get(update.prompt_index)
        if current is None:
            merged[update.prompt_index] = update
            continue
        by_index = {delta.index: delta for delta in current.deltas}
        for delta in update.deltas:
            previous = by_index.get(delta.index)
            by_index[delta.index] = delta if previous is None else merge_deltas(previous, delta)
        current.deltas = list(by_index.values())
        current.prompt_logprobs = current.prompt_logprobs or update.prompt_logprobs
        current.num_cached_tokens = update.num_cached_tokens
        current.error = current.error or update.error
    return list(merged.values())


async def pump(engine: AsyncEngine, index: int, generation: GenerationInput, queue: asyncio.Queue) -> None:
    params = generation.params[index]
    request_id = generation.request_id if len(generation.prompts) == 1 else f"{generation.request_id}-{index}"
    stream = engine.generate(request_id, generation.prompts[index].token_ids, params, generation.arrival_time)
    try:
        async for output in stream:
            queue.put_nowait(to_update(index, params.n, output))
        queue.put_nowait(FINISHED)
    except asyncio.CancelledError:
        raise
    except Exception as error:  # handed to the consumer, which answers it in OpenAI's shape
        queue.put_nowait(from_engine_error(error))
    finally:
        await stream.aclose()


async def generate(engine: AsyncEngine, generation: GenerationInput, ticket: Ticket) -> AsyncIterator[list[PromptUpdate]]:
    """Yields batches of updates until every choice finished. A drain abort ends the unfinished choices with
    ``finish_reason="abort"``; stopping the iteration (client gone) aborts the engine requests."""
    queue: asyncio.Queue = asyncio.Queue()
    n = generation.params[0].n
    progress = ChoiceProgress(unfinished=set(range(len(generation.prompts) * n)))
    pumps = [asyncio.create_task(pump(engine, index, generation, queue)) for index in range(len(generation.prompts))]
    abort_waiter = asyncio.create_task(wait_and_put(ticket.abort, queue))
    running = len(pumps)
    try:
        while running:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            updates = []
            for item in items:
                if item is ABORTED:
                    yield coalesce(updates) + abort_updates(progress, n)
                    return
                if item is FINISHED:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    if item.error is not None:
                        raise APIError(500, f"The engine failed this request: {item.error}", code="engine_error")
                    for delta in item.deltas:
                        progress.record(delta)
                    updates.append(item)
            if updates:
                yield coalesce(updates)
    finally:
        abort_waiter.cancel()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, abort_waiter, return_exceptions=True)


async def wait_and_put(event: asyncio.Event, queue: asyncio.Queue) -> None:
    await event.wait()
    queue.put_nowait(ABORTED)


def abort_updates(progress: ChoiceProgress, n: int) -> list[PromptUpdate]:
    by_prompt: dict[int, PromptUpdate] = {}
    for index in sorted(progress.unfinished):
        update = by_prompt.setdefault(index // n, PromptUpdate(prompt_index=index // n, deltas=[]))
        update.deltas.append(CompletionDelta(index=index, text="", token_ids=[], finish_reason="abort"))
    return list(by_prompt.values())
