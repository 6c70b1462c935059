"""Bad input to the Messages API: a clear 4xx in Anthropic's error shape (never a 500, never a hung stream),
API keys as x-api-key or Bearer, and the OpenAI routes keeping OpenAI's shape."""
from collections.abc import Iterator

import anthropic
import httpx
import pytest
from anthropic_schema import validate
from api_server import ServerProcess
from conftest import MODEL

ASK = [{"role": "user", "content": "In the beginning"}]
VALID = {"model": MODEL, "max_tokens": 4, "messages": ASK}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
BAD_BODIES = {
    "no max_tokens": ({"model": MODEL, "messages": ASK}, "max_tokens"),
    "max_tokens zero": ({**VALID, "max_tokens": 0}, "max_tokens"),
    "max_tokens a string": ({**VALID, "max_tokens": "4"}, "max_tokens"),
    "no model": ({"max_tokens": 4, "messages": ASK}, "model"),
    "no messages": ({**VALID, "messages": []}, "messages"),
    "a system role": ({**VALID, "messages": [{"role": "system", "content": "x"}]}, "role"),
    "an image": ({**VALID, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}, "image"),
    "a document": ({**VALID, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}]}, "document"),
    "an image in a tool result": ({**VALID, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "image", "source": {}}]}]}]}, "image"),
    "a tool_use from the user": ({**VALID, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]}]}, "tool_use"),
    "an unknown block": ({**VALID, "messages": [{"role": "user", "content": [{"type": "video"}]}]}, "video"),
    "a server tool": ({**VALID, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
    "a tool without a schema": ({**VALID, "tools": [{"name": "f"}]}, "input_schema"),
    "an unknown tool_choice": ({**VALID, "tools": [{"name": "f", "input_schema": TIME}],
                                "tool_choice": {"type": "tool", "name": "g"}}, "'g'"),
    "tool_choice any without tools": ({**VALID, "tool_choice": {"type": "any"}}, "tool"),
    "a bad tool_choice type": ({**VALID, "tool_choice": {"type": "sometimes"}}, "tool_choice"),
    "an invalid input_schema": ({**VALID, "tools": [{"name": "f", "input_schema": {"type": "integr"}}],
                                 "tool_choice": {"type": "any"}}, "cannot be enforced"),
    "a bad tool name": ({**VALID, "tools": [{"name": "no spaces", "input_schema": TIME}]}, "name"),
    "a prompt over the context": ({**VALID, "messages": [{"role": "user", "content": "light " * 3000}]},
                                  "context length"),
    "a temperature out of range": ({**VALID, "temperature": -1.0}, "temperature"),
    "a body that is a list": ([VALID], "JSON object"),
}


def assert_error(response: httpx.Response, status: int, error_type: str, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    validate(body, "ErrorResponse")
    assert body["error"]["type"] == error_type
    assert body["request_id"] == response.headers["request-id"]
    for word in words:
        assert word.lower() in body["error"]["message"].lower(), body


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", BAD_BODIES)
def test_bad_body(http: httpx.Client, case: str, stream: bool) -> None:
    body, word = BAD_BODIES[case]
    if stream and isinstance(body, dict):
        body = {**body, "stream": True}
    assert_error(http.post("/v1/messages", json=body), 400, "invalid_request_error", word)


def test_bad_count_tokens_bodies(http: httpx.Client) -> None:
    for case in ("no model", "no messages", "an image", "a server tool", "an unknown tool_choice"):
        body, word = BAD_BODIES[case]
        body = {key: value for key, value in body.items() if key != "max_tokens"}
        assert_error(http.post("/v1/messages/count_tokens", json=body), 400, "invalid_request_error", word)


def test_not_json(http: httpx.Client) -> None:
    response = http.post("/v1/messages", content=b'{"model": ', headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_request_error", "not valid JSON")


def test_unknown_model(http: httpx.Client, server: ServerProcess) -> None:
    assert_error(http.post("/v1/messages", json={**VALID, "model": "claude-opus-4"}), 404, "not_found_error",
                 "claude-opus-4")
    assert_error(http.post("/v1/messages/count_tokens", json={"model": "claude-opus-4", "messages": ASK}), 404,
                 "not_found_error")
    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(anthropic.NotFoundError) as raised:
        claude.messages.create(model="claude-opus-4", max_tokens=4, messages=ASK)
    assert raised.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as raised:
        claude.messages.create(model=MODEL, max_tokens=4, messages=ASK, tool_choice={"type": "any"})
    assert raised.value.body["error"]["type"] == "invalid_request_error"


def test_unknown_routes_and_methods(http: httpx.Client) -> None:
    assert_error(http.post("/v1/messages/batches", json=VALID), 404, "not_found_error")
    response = http.get("/v1/messages")
    assert response.status_code == 405 and response.json()["type"] == "error"


def test_openai_routes_keep_openai_errors(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={"model": "claude-opus-4", "messages": ASK})
    assert response.status_code == 404
    assert set(response.json()) == {"error"} and response.json()["error"]["code"] == "model_not_found"


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[ServerProcess]:
    with ServerProcess("--api-key", "sk-right") as process:
        yield process


def test_api_keys(keyed_server: ServerProcess) -> None:
    url = keyed_server.url
    for key in ("sk-right", "sk-wrong"):
        right = key == "sk-right"
        by_key = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=60)
        by_token = anthropic.Anthropic(base_url=url, auth_token=key, max_retries=0, timeout=60)
        for claude in (by_key, by_token):
            if right:
                assert claude.messages.create(model=MODEL, max_tokens=2, messages=ASK).type == "message"
                assert claude.messages.count_tokens(model=MODEL, messages=ASK).input_tokens > 0
                continue
            with pytest.raises(anthropic.AuthenticationError) as raised:
                claude.messages.create(model=MODEL, max_tokens=2, messages=ASK)
            assert raised.value.body["error"]["type"] == "authentication_error"
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        assert_error(httpx.post(url + path, json=VALID), 401, "authentication_error", "x-api-key")
        response = httpx.post(url + path, json={**VALID, "stream": True}, headers={"x-api-key": "sk-wrong"})
        assert_error(response, 401, "authentication_error")
    openai_error = httpx.post(url + "/v1/chat/completions", json={"messages": ASK})
    assert openai_error.status_code == 401 and openai_error.json()["error"]["code"] == "invalid_api_key"
