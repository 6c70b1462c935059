"""POST /v1/completions: prompts as text, text lists, token ids or token-id lists; echo; legacy logprobs."""
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from scheduler.async_engine import AsyncEngine
from scheduler.outputs import CompletionDelta, TokenLogprob
from server.admission import Ticket
from server.generation import GenerationInput, generate
from server.logprobs import CompletionLogprobs
from server.protocol.completions import CompletionRequest
from server.request_log import RequestRecord
from server.sampling import build_sampling_params, check_num_sequences, check_prompts
from server.serving import GenerationRoute, usage
from server.streaming import DONE_EVENT, ChunkEncoder, sse_event
from server.structured_outputs import request_spec, validate_or_400
from server.unsupported import reject_unsupported_completion


def concat_logprobs(parts: list[dict[str, list]]) -> dict[str, list]:
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {key: [value for part in parts for value in part[key]] for key in keys}


class ChoiceEcho:
    """What goes before a choice's first generated text when ``echo`` is set: the prompt, and its logprobs."""

    def __init__(self, route: "Completions", body: CompletionRequest, generation: GenerationInput) -> None:
        self.route = route
        self.body = body
        self.generation = generation
        self.prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}
        self.logprob_builders: dict[int, CompletionLogprobs] = {}

    def prompt_index(self, choice_index: int) -> int:
        return choice_index // self.body.n

    def text(self, choice_index: int) -> str:
        prompt = self.generation.prompts[self.prompt_index(choice_index)]
        if prompt.text is not None:
            return prompt.text
        return self.route.state.engine.tokenizer.decode(prompt.token_ids)

    def builder(self, choice_index: int) -> CompletionLogprobs:
        if choice_index not in self.logprob_builders:
            self.logprob_builders[choice_index] = CompletionLogprobs(self.route.state.token_texts,
                                                                     self.body.skip_special_tokens)
        return self.logprob_builders[choice_index]

    def logprobs(
        self, choice_index: int, entries: list[TokenLogprob], token_ids: list[int], first: bool
    ) -> dict | None:
        """The logprobs of ``token_ids`` (with the echoed prompt's in front on the ``first`` call)."""
        if self.body.logprobs is None:
            return None
        builder = self.builder(choice_index)
        parts = []
        if first and self.body.echo:
            prompt = self.generation.prompts[self.prompt_index(choice_index)]
            prompt_entries = self.prompt_logprobs.get(self.prompt_index(choice_index)) or [None] * len(prompt.token_ids)
            parts.append(builder.build(prompt.token_ids, prompt_entries))
        parts.append(builder.build(token_ids, entries))
        return concat_logprobs(parts)


class Completions(GenerationRoute[CompletionRequest]):
    route = "/v1/completions"
    id_prefix = "cmpl"
    request_model = CompletionRequest

    def num_sequences(self, body: CompletionRequest) -> int:
        prompt = body.prompt
        num_prompts = 1 if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int) else len(prompt)
        check_num_sequences(num_prompts, body.n)
        return num_prompts * body.n

    async def prepare(self, body: CompletionRequest, engine: AsyncEngine, record: RequestRecord) -> GenerationInput:
        reject_unsupported_completion(body)
        params = build_sampling_params(
            body, max_tokens=body.max_tokens, logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if body.echo else None,
        )
        spec, spec_param = request_spec(body.response_format, body.structured_outputs)
        await validate_or_400(engine.grammar_validator, spec, spec_param)
        params = replace(params, structured_output=spec)
        prompts = await self.state.tokenization.completion_prompts(body.prompt)
        per_prompt = check_prompts(engine, [prompt.token_ids for prompt in prompts], params,
                                   {"prompt_logprobs": "logprobs"})
        record.prompt_tokens = sum(len(prompt.token_ids) for prompt in prompts)
        texts = [prompt.text for prompt in prompts]
        record.prompt_text = texts[0] if len(texts) == 1 else repr(texts)
        return GenerationInput(record.completion_id, prompts, per_prompt, record.arrival_time,
                               self.state.check_priority(body.priority))

    async def stream(
        self, body: CompletionRequest, engine: AsyncEngine, generation: GenerationInput, ticket: Ticket,
        record: RequestRecord,
    ) -> AsyncIterator[bytes]:
        header = {"id": record.completion_id, "object": "text_completion", "created": int(time.time()),
                  "model": self.config.model_name}
        # Unlike chat chunks, the completion schema has no null usage: it is absent until there is one.
        chunks = ChunkEncoder(header, with_usage=body.continuous_usage_stats)
        cached: dict[int, int] = {}
        echo = ChoiceEcho(self, body, generation)
        started: set[int] = set()

        def running_usage() -> dict | None:
            if not body.continuous_usage_stats:
                return None
            return usage(record.prompt_tokens, record.completion_tokens, sum(cached.values()))

        async for update in generate(engine, generation, ticket):
            cached[update.prompt_index] = update.num_cached_tokens
            if update.prompt_logprobs is not None:
                echo.prompt_logprobs[update.prompt_index] = update.prompt_logprobs
            events = []
            for delta in update.deltas:
                record.saw_tokens(len(delta.token_ids))
                first = delta.index not in started
                started.add(delta.index)
                choice = self.choice(body, echo, delta, first)
                if choice["text"] or delta.token_ids or (first and body.return_token_ids):
                    events.append(chunks.event(choice, running_usage()))
                if delta.finish_reason is not None:
                    record.finish_reasons.append(delta.finish_reason)
                    finish = {"index": delta.index, "text": "", "logprobs": None, "finish_reason": delta.finish_reason}
                    events.append(chunks.event(finish, running_usage()))
            if events:
                yield b"".join(events)
        if body.include_usage:
            final_usage = usage(record.prompt_tokens, record.completion_tokens, sum(cached.values()))
            yield sse_event({**header, "choices": [], "usage": final_usage}) + DONE_EVENT
        else:
            yield DONE_EVENT

    def choice(self, body: CompletionRequest, echo: ChoiceEcho, delta: CompletionDelta, first: bool) -> dict:
        text = echo.text(delta.index) + delta.text if first and body.echo else delta.text
        choice = {"index": delta.index, "text": text,
                  "logprobs": echo.logprobs(delta.index, delta.logprobs or [], delta.token_ids, first),
                  "finish_reason": None}
        if body.return_token_ids:
            if first:
                choice["prompt_token_ids"] = echo.generation.prompts[echo.prompt_index(delta.index)].token_ids
            choice["token_ids"] = delta.token_ids
        return choice

    async def collect(
        self, body: CompletionRequest, engine: AsyncEngine, generation: GenerationInput, ticket: Ticket,
        record: RequestRecord,
    ) -> dict:
        num_choices = len(generation.prompts) * body.n
        merged: dict[int, CompletionDelta] = {
            index: CompletionDelta(index=index, text="", token_ids=[], logprobs=[]) for index in range(num_choices)
        }
        echo = ChoiceEcho(self, body, generation)
        cached: dict[int, int] = {}
        async for update in generate(engine, generation, ticket):
            cached[update.prompt_index] = update.num_cached_tokens
            if update.prompt_logprobs is not None:
                echo.prompt_logprobs[update.prompt_index] = update.prompt_logprobs
            for delta in update.deltas:
                record.saw_tokens(len(delta.token_ids))
                total = merged[delta.index]
                total.text += delta.text
                total.token_ids.extend(delta.token_ids)
                total.logprobs.extend(delta.logprobs or [])
                if delta.finish_reason is not None:
                    total.finish_reason = delta.finish_reason
                    record.finish_reasons.append(delta.finish_reason)
        choices = []
        for index in range(num_choices):
            choice = self.choice(body, echo, merged[index], first=True)
            choice["finish_reason"] = merged[index].finish_reason
            choices.append(choice)
        return {
            "id": record.completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.config.model_name,
            "choices": choices,
            "usage": usage(record.prompt_tokens, record.completion_tokens, sum(cached.values())),
        }
