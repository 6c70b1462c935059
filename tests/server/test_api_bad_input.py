"""Bad requests get a 4xx in OpenAI's error shape, naming the parameter, and leave the server healthy."""
import json

import httpx
import pytest
from api_server import ServerProcess
from conftest import MODEL
from openai_schema import validate

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


def chat_body(**fields: object) -> bytes:
    return json.dumps({"model": MODEL, "messages": USER, "max_tokens": 4, **fields}).encode()


def completion_body(**fields: object) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 4, **fields}).encode()


# (path, raw body, status, param, code); param/code None means "not checked beyond being in the body".
CASES = {
    "malformed JSON": (CHAT, b'{"messages": [', 400, None, "invalid_json"),
    "invalid UTF-8": (CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None, "invalid_json"),
    "body not an object": (CHAT, b"[1, 2]", 400, None, None),
    "empty body": (CHAT, b"", 400, None, "invalid_json"),
    "NaN temperature": (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
                        "temperature", None),
    "max_tokens as string": (CHAT, chat_body(max_tokens="10"), 400, "max_tokens", None),
    "messages not a list": (CHAT, chat_body(messages="hello"), 400, "messages", None),
    "missing messages": (CHAT, json.dumps({"model": MODEL}).encode(), 400, "messages", None),
    "empty messages": (CHAT, chat_body(messages=[]), 400, "messages", None),
    "unknown role": (CHAT, chat_body(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role", None),
    "tool message without tool_call_id": (CHAT, chat_body(messages=[{"role": "tool", "content": "x"}]), 400,
                                         "messages[0]", None),
    "user without content": (CHAT, chat_body(messages=[{"role": "user"}]), 400, "messages[0]", None),
    "image part": (CHAT, chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://x/y.png"}}]}]), 400, "messages[0].content", None),
    "negative max_tokens": (CHAT, chat_body(max_tokens=-5), 400, "max_tokens", None),
    "zero max_completion_tokens": (CHAT, chat_body(max_completion_tokens=0), 400, "max_completion_tokens", None),
    "huge max_tokens": (CHAT, chat_body(max_tokens=10**12), 400, "max_tokens", "context_length_exceeded"),
    "huge integer": (CHAT, chat_body(max_tokens=10**40), 400, "max_tokens", "context_length_exceeded"),
    "n zero": (CHAT, chat_body(n=0), 400, "n", None),
    "n over the limit": (CHAT, chat_body(n=1000), 400, "n", None),
    "negative temperature": (CHAT, chat_body(temperature=-1), 400, "temperature", None),
    "temperature too high": (CHAT, chat_body(temperature=3.5), 400, "temperature", None),
    "top_p zero": (CHAT, chat_body(top_p=0), 400, "top_p", None),
    "presence_penalty too high": (CHAT, chat_body(presence_penalty=5), 400, "presence_penalty", None),
    "top_logprobs too high": (CHAT, chat_body(logprobs=True, top_logprobs=50), 400, "top_logprobs", None),
    "top_logprobs without logprobs": (CHAT, chat_body(top_logprobs=2), 400, "top_logprobs", None),
    "logit_bias key not a token": (CHAT, chat_body(logit_bias={"abc": 1}), 400, "logit_bias", None),
    "logit_bias token outside vocab": (CHAT, chat_body(logit_bias={"999999": 1}), 400, "logit_bias", None),
    "seed too large": (CHAT, chat_body(seed=2**70), 400, "seed", None),
    "empty stop string": (CHAT, chat_body(stop=[""]), 400, "stop", None),
    "stop of wrong type": (CHAT, chat_body(stop=[1, 2]), 400, "stop", None),
    "stop_token_ids outside vocab": (CHAT, chat_body(stop_token_ids=[10**7]), 400, "stop_token_ids", None),
    "min_tokens over max_tokens": (CHAT, chat_body(min_tokens=10), 400, "min_tokens", None),
    "min_tokens over the context": (CHAT, chat_body(min_tokens=3000, max_tokens=None, stream=True), 400, "min_tokens",
                                    None),
    "tool_choice required without tools": (CHAT, chat_body(tool_choice="required"), 400, "tool_choice", None),
    "invalid response_format schema": (CHAT, chat_body(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}), 400, "response_format", "invalid_constraint"),
    "stream_options without stream": (CHAT, chat_body(stream_options={"include_usage": True}), 400,
                                      "stream_options", None),
    "continue_final_message after a user turn": (CHAT, chat_body(continue_final_message=True,
                                                                 add_generation_prompt=False), 400, "messages", None),
    "unknown model": (CHAT, chat_body(model="gpt-4o"), 404, "model", "model_not_found"),
    "empty prompt": (COMPLETIONS, completion_body(prompt=""), 400, "prompt", None),
    "empty prompt list": (COMPLETIONS, completion_body(prompt=[]), 400, "prompt", None),
    "empty token-id list": (COMPLETIONS, completion_body(prompt=[[]]), 400, "prompt", None),
    "token id outside vocab": (COMPLETIONS, completion_body(prompt=[1, 2, 99999]), 400, "prompt", None),
    "negative token id": (COMPLETIONS, completion_body(prompt=[-1]), 400, "prompt", None),
    "mixed prompt list": (COMPLETIONS, completion_body(prompt=["a", 1]), 400, "prompt", None),
    "prompt too long": (COMPLETIONS, completion_body(prompt=[5] * 2100), 400, "prompt", "context_length_exceeded"),
    "logprobs too high": (COMPLETIONS, completion_body(logprobs=50), 400, "logprobs", None),
    "suffix": (COMPLETIONS, completion_body(suffix="end"), 400, "suffix", None),
    "best_of": (COMPLETIONS, completion_body(best_of=3), 400, "best_of", None),
    "detokenize outside vocab": ("/detokenize", json.dumps({"tokens": [1, 10**6]}).encode(), 400, "tokens", None),
    "tokenize with both inputs": ("/tokenize", json.dumps({"prompt": "a", "messages": USER}).encode(), 400, "prompt",
                                  None),
    "unknown model card": ("/v1/models/gpt-4o", None, 404, "model", "model_not_found"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_an_openai_error(http: httpx.Client, case: str) -> None:
    path, body, status, param, code = CASES[case]
    if body is None:
        response = http.get(path)
    else:
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    payload = response.json()
    validate(payload, "ErrorResponse")
    error = payload["error"]
    assert error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def test_context_length_message_states_the_numbers(http: httpx.Client) -> None:
    response = http.post(COMPLETIONS, content=completion_body(prompt=[5] * 100, max_tokens=5000))
    message = response.json()["error"]["message"]
    assert "2048" in message and "100" in message and "5000" in message


def test_unknown_route_and_method(http: httpx.Client) -> None:
    missing = http.get("/v1/engines")
    assert missing.status_code == 404
    validate(missing.json(), "ErrorResponse")
    wrong_method = http.get(CHAT)
    assert wrong_method.status_code == 405
    validate(wrong_method.json(), "ErrorResponse")


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    huge = chat_body(messages=[{"role": "user", "content": "x" * (9 * 1024 * 1024)}])
    response = http.post(CHAT, content=huge)
    assert response.status_code == 413
    validate(response.json(), "ErrorResponse")


def test_unknown_fields_are_ignored_with_a_warning(http: httpx.Client, server: ServerProcess) -> None:
    response = http.post(CHAT, content=chat_body(frobnicate=True, max_tokens=2))
    assert response.status_code == 200, response.text
    assert "ignoring unknown fields ['frobnicate']" in server.log_text()


def test_server_stays_healthy_after_bad_input(http: httpx.Client) -> None:
    for path, body, _, _, _ in CASES.values():
        if body is not None:
            http.post(path, content=body)
    assert http.get("/health").json()["status"] == "ok"
    assert http.get("/ready").status_code == 200
    health = http.get("/health").json()
    assert health["in_flight_requests"] == 0 and health["num_running"] == 0
    response = http.post(CHAT, content=chat_body(max_tokens=3, ignore_eos=True))
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3


CAPS = {
    "stop strings": (CHAT, chat_body(stop=[f"s{i}" for i in range(17)]), "stop", "16"),
    "stop string length": (CHAT, chat_body(stop=["x" * 257]), "stop", "256"),
    "stop_token_ids": (CHAT, chat_body(stop_token_ids=list(range(129))), "stop_token_ids", "128"),
    "logit_bias entries": (CHAT, chat_body(logit_bias={str(i): 1 for i in range(301)}), "logit_bias", "300"),
    "top_logprobs": (CHAT, chat_body(logprobs=True, top_logprobs=21), "top_logprobs", "20"),
    "n x prompts": (COMPLETIONS, completion_body(prompt=["a"] * 9, n=16), "n", "128"),
}


@pytest.mark.parametrize("case", list(CAPS))
def test_each_cap_is_a_400_naming_its_limit(http: httpx.Client, case: str) -> None:
    path, body, param, limit = CAPS[case]
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    validate(response.json(), "ErrorResponse")
    error = response.json()["error"]
    assert error["param"] == param and limit in error["message"], error
