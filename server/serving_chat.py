"""POST /v1/chat/completions."""
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from scheduler.async_engine import AsyncEngine
from scheduler.outputs import TokenLogprob
from server.admission import Ticket
from server.chat_output import ChoiceOutput
from server.errors import invalid_request
from server.generation import GenerationInput, generate
from server.logprobs import chat_logprobs
from server.protocol.chat import ChatCompletionRequest
from server.request_log import RequestRecord
from server.sampling import build_sampling_params, check_prompts
from server.serving import GenerationRoute, usage
from server.streaming import DONE_EVENT, ChunkEncoder
from server.structured_outputs import request_spec
from server.tools import answer_constraint, parse_tools


class ChatCompletions(GenerationRoute[ChatCompletionRequest]):
    route = "/v1/chat/completions"
    id_prefix = "chatcmpl"
    request_model = ChatCompletionRequest

    async def prepare(self, body: ChatCompletionRequest, engine: AsyncEngine, record: RequestRecord) -> GenerationInput:
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        max_tokens, max_tokens_param = body.completion_token_limit()
        params = build_sampling_params(
            body, max_tokens=max_tokens, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            prompt_logprobs=None,
        )
        tools = parse_tools(body)
        spec, param = request_spec(body.response_format, body.structured_outputs)
        constraint = await answer_constraint(spec, param, tools, engine.grammar_validator)
        params = replace(params, structured_output=constraint)
        prompt = await self.state.tokenization.chat_prompt(
            body.messages, body.add_generation_prompt, body.continue_final_message, tools.template_tools()
        )
        [params] = check_prompts(engine, [prompt.token_ids], params,
                                 {"max_tokens": max_tokens_param, "logprobs": "top_logprobs", "prompt": "messages"})
        record.prompt_tokens = len(prompt.token_ids)
        record.prompt_text = prompt.text
        return GenerationInput(record.completion_id, [prompt], [params], record.arrival_time,
                               self.state.check_priority(body.priority))

    def logprobs(self, body: ChatCompletionRequest, entries: list[TokenLogprob] | None) -> dict | None:
        if not body.logprobs:
            return None
        return chat_logprobs(entries or [], self.state.token_texts)

    async def stream(
        self, body: ChatCompletionRequest, engine: AsyncEngine, generation: GenerationInput, ticket: Ticket,
        record: RequestRecord,
    ) -> AsyncIterator[bytes]:
        header = {"id": record.completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                  "model": self.config.model_name}
        chunks = ChunkEncoder(header, with_usage=body.include_usage or body.continuous_usage_stats)
        cached_tokens = 0
        setup = parse_tools(body)
        outputs = [ChoiceOutput(setup) for _ in range(body.n)]

        def running_usage() -> dict | None:
            if not body.continuous_usage_stats:
                return None
            return usage(record.prompt_tokens, record.completion_tokens, cached_tokens)

        prompt_ids = {"prompt_token_ids": generation.prompts[0].token_ids} if body.return_token_ids else None
        yield b"".join(
            chunks.event({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}, running_usage(), extra=prompt_ids if index == 0 else None)
            for index in range(body.n)
        )
        async for update in generate(engine, generation, ticket):
            cached_tokens = update.num_cached_tokens
            events = []
            for delta in update.deltas:
                record.saw_tokens(len(delta.token_ids))
                output = outputs[delta.index]
                content, tool_deltas = output.feed(delta.text)
                if delta.finish_reason is not None:
                    rest, more_deltas = output.finish()
                    content, tool_deltas = content + rest, tool_deltas + more_deltas
                if content and tool_deltas:
                    choice = {"index": delta.index, "delta": {"content": content}, "logprobs": None,
                              "finish_reason": None}
                    events.append(chunks.event(choice, running_usage()))
                    content = ""
                if content or tool_deltas or delta.token_ids:
                    choice = {"index": delta.index, "delta": output.delta(content, tool_deltas),
                              "logprobs": self.logprobs(body, delta.logprobs), "finish_reason": None}
                    if body.return_token_ids:
                        choice["token_ids"] = delta.token_ids
                    events.append(chunks.event(choice, running_usage()))
                if delta.finish_reason is not None:
                    record.finish_reasons.append(delta.finish_reason)
                    finish = {"index": delta.index, "delta": {}, "logprobs": None,
                              "finish_reason": output.finish_reason(delta.finish_reason)}
                    events.append(chunks.event(finish, running_usage()))
            if events:
                yield b"".join(events)
        if body.include_usage:
            yield chunks.event(None, usage(record.prompt_tokens, record.completion_tokens, cached_tokens)) + DONE_EVENT
        else:
            yield DONE_EVENT

    async def collect(
        self, body: ChatCompletionRequest, engine: AsyncEngine, generation: GenerationInput, ticket: Ticket,
        record: RequestRecord,
    ) -> dict:
        texts: list[list[str]] = [[] for _ in range(body.n)]
        token_ids: list[list[int]] = [[] for _ in range(body.n)]
        entries: list[list[TokenLogprob]] = [[] for _ in range(body.n)]
        finish_reasons: list[str | None] = [None] * body.n
        cached_tokens = 0
        async for update in generate(engine, generation, ticket):
            cached_tokens = update.num_cached_tokens
            for delta in update.deltas:
                record.saw_tokens(len(delta.token_ids))
                texts[delta.index].append(delta.text)
                token_ids[delta.index].extend(delta.token_ids)
                entries[delta.index].extend(delta.logprobs or [])
                if delta.finish_reason is not None:
                    finish_reasons[delta.index] = delta.finish_reason
                    record.finish_reasons.append(delta.finish_reason)
        setup = parse_tools(body)
        choices = []
        for index in range(body.n):
            output = ChoiceOutput(setup)
            choice = {
                "index": index,
                "message": output.message("".join(texts[index])),
                "logprobs": self.logprobs(body, entries[index]),
                "finish_reason": output.finish_reason(finish_reasons[index]),
            }
            if body.return_token_ids:
                choice["token_ids"] = token_ids[index]
            choices.append(choice)
        response = {
            "id": record.completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.config.model_name,
            "choices": choices,
            "usage": usage(record.prompt_tokens, record.completion_tokens, cached_tokens),
        }
        if body.return_token_ids:
            response["prompt_token_ids"] = generation.prompts[0].token_ids
        return response
