"""The server's pure pieces: error locations, token bytes, logprob shapes, admission, stream errors."""
import asyncio
import json
import math
from collections.abc import AsyncIterator

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from model.embedded import EMBEDDED_MODEL_DIR
from scheduler.config import EngineConfig
from scheduler.outputs import TokenLogprob
from server.admission import Admission
from server.app import build_app
from server.config import ServerConfig
from server.errors import APIError, param_from_location
from server.logprobs import LOWEST_LOGPROB, CompletionLogprobs, chat_logprobs
from server.metrics import ServerMetrics
from server.request_log import RequestRecord
from server.serving_chat import ChatCompletions
from server.state import ServerState
from server.token_text import TokenTexts


@pytest.fixture(scope="module")
def texts() -> TokenTexts:
    return TokenTexts(AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR))


def test_param_from_pydantic_location() -> None:
    assert param_from_location(("messages", 0, "role")) == "messages[0].role"
    assert param_from_location(("stop", "list[str]", 1)) == "stop"
    assert param_from_location(("prompt", "str")) == "prompt"
    assert param_from_location(()) is None


def test_token_bytes_rebuild_the_text_even_inside_characters(texts: TokenTexts) -> None:
    text = "Grüße, 你好 — ok <|response|>"
    ids = texts.tokenizer.encode(text, add_special_tokens=False)
    assert any(texts.text(i) == "\ufffd" for i in ids)  # some tokens hold part of a character
    assert bytes(b for i in ids for b in texts.bytes(i)).decode() == text


def test_chat_logprobs_shape_and_unlikely_tokens(texts: TokenTexts) -> None:
    entry = TokenLogprob(token_id=40, logprob=-math.inf, top=[(41, -0.5), (40, -math.inf)])
    [content] = chat_logprobs([entry], texts)["content"]
    assert content["logprob"] == LOWEST_LOGPROB  # JSON has no -inf
    assert content["bytes"] == texts.bytes(40)
    assert [top["logprob"] for top in content["top_logprobs"]] == [-0.5, LOWEST_LOGPROB]


def test_completion_logprobs_offsets_run_across_calls(texts: TokenTexts) -> None:
    ids = texts.tokenizer.encode("Hello world again", add_special_tokens=False)
    builder = CompletionLogprobs(texts)
    first = builder.build(ids[:1], [None])
    rest = builder.build(ids[1:], [TokenLogprob(i, -1.0, [(i, -1.0)]) for i in ids[1:]])
    assert first["token_logprobs"] == [None] and first["top_logprobs"] == [None]
    offsets = first["text_offset"] + rest["text_offset"]
    tokens = first["tokens"] + rest["tokens"]
    assert offsets == [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
    assert "".join(tokens) == "Hello world again"


def test_admission_caps_then_drains_then_aborts() -> None:
    async def scenario() -> None:
        admission = Admission(max_concurrent_requests=2)
        first, second = admission.admit(), admission.admit()
        with pytest.raises(APIError) as over:
            admission.admit()
        assert over.value.status == 429 and over.value.headers["Retry-After"]
        admission.release(first)
        drain = asyncio.create_task(admission.drain(timeout=0.05))
        await asyncio.sleep(0)
        with pytest.raises(APIError) as draining:
            admission.admit()
        assert draining.value.status == 503
        aborted: list[str] = []

        def abort_engine_request(request_id: str) -> None:  # the engine ends it, so the request finishes
            aborted.append(request_id)
            admission.release(second)

        second.track("engine-request-2", abort_engine_request)
        await asyncio.wait_for(drain, 30)  # past the deadline the remaining request is aborted, then waited for
        assert aborted == ["engine-request-2"]

    asyncio.run(scenario())


def test_error_after_the_stream_started_is_an_sse_event_then_done() -> None:
    state = ServerState(ServerConfig(served_model_names=["m"]), EngineConfig(), ServerMetrics("m", {}))
    record = RequestRecord(completion_id="chatcmpl-1", request_id="r", route="/v1/chat/completions", arrival_time=0.0)

    async def events_that_fail() -> AsyncIterator[bytes]:
        yield b"data: {}\n\n"
        raise APIError(503, "The engine has stopped.", code="engine_dead")

    async def collect() -> list[bytes]:
        return [event async for event in ChatCompletions(state).guard_stream(events_that_fail(), record)]

    first, failure = asyncio.run(collect())
    assert first == b"data: {}\n\n"
    error_event, done = failure.split(b"\n\n", 1)
    assert json.loads(error_event.removeprefix(b"data: ")) == {
        "error": {"message": "The engine has stopped.", "type": "service_unavailable_error", "param": None,
                  "code": "engine_dead"}}
    assert done == b"data: [DONE]\n\n"
    assert record.outcome == "error"


def test_requests_while_loading_get_503_with_retry_after() -> None:
    state = ServerState(ServerConfig(served_model_names=["m"]), EngineConfig(), ServerMetrics("m", {}))
    assert not state.is_ready
    with pytest.raises(APIError) as loading:
        state.ready_engine()
    assert loading.value.status == 503 and loading.value.code == "model_loading"
    assert loading.value.headers["Retry-After"]
    state.admission.draining = True
    with pytest.raises(APIError) as draining:
        state.ready_engine()
    assert draining.value.code == "server_draining"


def test_metrics_report_not_ready_while_loading() -> None:
    state = ServerState(ServerConfig(served_model_names=["m"]), EngineConfig(), ServerMetrics("m", {}))
    app = build_app(state, on_load_failure=lambda: None)
    response = TestClient(app).get("/metrics")  # no lifespan: the model never starts loading, as at start-up
    assert response.status_code == 200
    assert 'dots_serve_ready{model_name="m"} 0.0' in response.text.splitlines()
