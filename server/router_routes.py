"""The routes that routers in front of several replicas call: GET /get_load and the two render routes.

``/get_load`` feeds ``power_of_two`` in vllm-router and sglang-router, which parse different bodies:
- vllm-router: ``{"load": N}`` with N = running + waiting requests;
- sglang-router: a list with one entry per data-parallel rank, ``[{"dp_rank", "num_reqs", "num_waiting_reqs",
  "num_tokens"}]``, summing ``num_tokens``. As in SGLang, ``num_reqs`` counts running plus waiting requests, and
  ``num_tokens`` the tokens held in the KV cache (whole blocks of running requests; reusable cached blocks count as
  free). Unlike SGLang it leaves out the prompts of waiting requests, which the engine does not report.
"""
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from server.render import Renderer
from server.serving_chat import ChatCompletions
from server.serving_completions import Completions
from server.state import ServerState

GET_LOAD_FORMATS = ("vllm-router", "sglang")


def load_body(state: ServerState) -> dict | list[dict]:
    engine = state.ready_engine()
    running, waiting = engine.num_running, engine.num_waiting
    if state.config.get_load_format == "vllm-router":
        return {"load": running + waiting}
    kv_tokens = round(engine.kv_cache_usage() * engine.num_kv_blocks * state.engine_config.block_size)
    return [{"dp_rank": 0, "num_reqs": running + waiting, "num_waiting_reqs": waiting, "num_tokens": kv_tokens}]


def add_router_routes(app: FastAPI, state: ServerState, chat: ChatCompletions, completions: Completions) -> None:
    if state.config.get_load_format not in GET_LOAD_FORMATS:
        raise ValueError(f"get_load_format must be one of {GET_LOAD_FORMATS}, got {state.config.get_load_format!r}")
    renderer = Renderer(state)

    @app.get("/get_load")
    async def get_load() -> JSONResponse:
        return JSONResponse(load_body(state))

    @app.post("/v1/completions/render")
    async def render_completion(request: Request) -> JSONResponse:
        return JSONResponse(await renderer.render(request, completions))

    @app.post("/v1/chat/completions/render")
    async def render_chat_completion(request: Request) -> JSONResponse:
        [rendered] = await renderer.render(request, chat)
        return JSONResponse(rendered)
