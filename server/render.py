"""POST /v1/completions/render and /v1/chat/completions/render: the engine request a body would become, unrun.

Precise prefix-cache routing (llm-d's endpoint picker with its ``vllm`` tokenizer) needs the exact token ids a
replica will run, chat template and tools applied. The answer has the shape of vLLM's token-in ``GenerateRequest``:
the completion route answers a list (one item per prompt), the chat route one object. The body goes through the
same preparation as a generation request, so what would be refused with a 4xx is refused here the same way; nothing
is admitted or sent to the engine.
"""
import time
import uuid
from dataclasses import asdict

from fastapi import Request

from scheduler.sampling_params import SamplingParams
from server.protocol.common import SamplingRequest
from server.request_log import RequestRecord
from server.serving import GenerationRoute, parse_body
from server.state import ServerState


def sampling_params_body(params: SamplingParams) -> dict:
    body = asdict(params)
    body["logit_bias"] = {str(token_id): bias for token_id, bias in params.logit_bias.items()}
    return body


class Renderer:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def render(self, request: Request, route: GenerationRoute) -> list[dict]:
        body: SamplingRequest = await parse_body(request, route.request_model)
        body.warn_unknown_fields(f"{route.route}/render")
        self.state.check_model(body.model)
        engine = self.state.ready_engine()
        record = RequestRecord(
            completion_id=f"{route.id_prefix}-{uuid.uuid4().hex}", request_id=request.state.request_id,
            route=f"{route.route}/render", arrival_time=time.monotonic(),
        )
        generation = await route.prepare(body, engine, record)
        stream_options = body.stream_options.model_dump() if body.stream_options is not None else None
        return [
            {
                "request_id": generation.engine_request_id(index),
                "token_ids": prompt.token_ids,
                "features": None,  # no multimodal inputs
                "sampling_params": sampling_params_body(params),
                "model": self.state.config.model_name,
                "stream": body.stream,
                "stream_options": stream_options,
                "cache_salt": None,
                "priority": 0,
                "kv_transfer_params": None,
            }
            for index, (prompt, params) in enumerate(zip(generation.prompts, generation.params))
        ]
