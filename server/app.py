"""The FastAPI application: routes, middleware, error handlers, and the engine's lifetime."""
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from server.anthropic.serving_messages import Messages
from server.chat_page import add_chat_page, page_url
from server.errors import APIError, install_error_handlers
from server.middleware import APIKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from server.protocol.tokenize import DetokenizeRequest, TokenizeRequest
from server.router_routes import add_router_routes
from server.responses.serving import Responses
from server.serving import parse_body
from server.serving_chat import ChatCompletions
from server.serving_completions import Completions
from server.state import ServerState

OWNED_BY = "dots-serve"
logger = logging.getLogger(__name__)


def build_app(state: ServerState, on_load_failure: Callable[[], None]) -> FastAPI:
    """``on_load_failure`` stops the server when the model cannot be loaded or the engine has died."""
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.config.ui:
            logger.info("Chat page: %s", page_url(state.config))
        loading = asyncio.create_task(state.load(on_load_failure))
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await asyncio.to_thread(state.shutdown)

    app = FastAPI(title="dots-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.config.max_request_body_bytes)
    if state.config.api_keys:
        app.add_middleware(APIKeyMiddleware, api_keys=state.config.api_keys)
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)  # outermost: every response gets an id
    if state.config.ui:
        add_chat_page(app)
    chat = ChatCompletions(state)
    completions = Completions(state)
    add_router_routes(app, state, chat, completions)
    responses = Responses(state)
    messages = Messages(state, chat)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY,
                "max_model_len": state.engine.max_model_len if state.engine is not None else None}

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return await chat.handle(request)

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        return await completions.handle(request)

    @app.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        return await responses.handle(request)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str) -> dict:
        return responses.store.get(response_id).response

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict:
        return responses.store.delete(response_id)

    @app.post("/v1/messages")
    async def create_message(request: Request) -> Response:
        return await messages.handle(request)

    @app.post("/v1/messages/count_tokens")
    async def count_message_tokens(request: Request) -> JSONResponse:
        return await messages.count_tokens(request)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(name) for name in state.config.served_model_names]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict:
        state.check_model(model_id)
        return model_card(model_id)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await parse_body(request, TokenizeRequest)
        body.warn_unknown_fields("/tokenize")
        state.check_model(body.model)
        engine = state.ready_engine()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "Give exactly one of prompt or messages.", param="prompt")
        if body.messages is not None:
            prompt = await state.tokenization.chat_prompt(
                body.messages, body.add_generation_prompt, body.continue_final_message
            )
            token_ids = prompt.token_ids
        else:
            token_ids = await state.tokenization.encode(body.prompt, body.add_special_tokens)
        return {"count": len(token_ids), "max_model_len": engine.max_model_len, "tokens": token_ids}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await parse_body(request, DetokenizeRequest)
        body.warn_unknown_fields("/detokenize")
        state.check_model(body.model)
        state.ready_engine()
        return {"prompt": await state.tokenization.decode(body.tokens)}

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness, plus the engine's load (how tests and operators see blocks being freed)."""
        engine = state.engine
        if state.load_error is not None or (engine is not None and not engine.is_alive):
            return JSONResponse({"status": "dead"}, status_code=503)
        if engine is None:
            return JSONResponse({"status": "loading"})
        return JSONResponse({
            "status": "draining" if state.admission.draining else "ok",
            "num_running": engine.num_running,
            "num_waiting": engine.num_waiting,
            "kv_cache_usage": engine.kv_cache_usage(),
            "in_flight_requests": len(state.admission.in_flight),
        })

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.is_ready:
            return JSONResponse({"status": "ready"})
        status = "draining" if state.admission.draining else "loading" if state.engine is None else "dead"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics() -> Response:
        engine = state.engine
        if engine is not None:
            # As of now, not as of the last engine step (an idle engine takes no steps).
            state.metrics.set_gauges(engine.num_running, engine.num_waiting, engine.kv_cache_usage())
        state.metrics.set_ready(state.is_ready)  # 0 while loading too, which the not-ready alert watches
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    return app
