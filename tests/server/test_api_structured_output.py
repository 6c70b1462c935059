"""response_format and structured_outputs through the real server and the official openai client: every answer
parses and validates against its schema, whatever the seed, streamed or not; bad constraints get a 400."""
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import httpx
import jsonschema
import openai
import pytest
from api_server import ServerProcess
from conftest import MODEL
from openai_schema import validate
from pydantic import BaseModel, Field
from sse_events import DONE, stream

CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "Answer in JSON."}]
SEEDS = range(4)
SCHEMAS = {
    "nested objects": {
        "type": "object",
        "properties": {
            "user": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 8},
                "contact": {"type": "object", "properties": {"email": {"type": "string", "maxLength": 12}},
                            "required": ["email"], "additionalProperties": False},
            }, "required": ["name", "contact"], "additionalProperties": False},
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "arrays with bounds and enums": {
        "type": "object",
        "properties": {
            "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 4},
            "sizes": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "maxItems": 3},
        },
        "required": ["colors", "sizes"],
        "additionalProperties": False,
    },
    "numbers, short strings and optional fields": {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": 0, "maximum": 100},
            "count": {"type": "integer", "minimum": -5, "maximum": 5},
            "label": {"type": "string", "maxLength": 5},
            "note": {"type": "string", "maxLength": 3},
        },
        "required": ["score", "count", "label"],
        "additionalProperties": False,
    },
}


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def post(http: httpx.Client, **body: object) -> dict:
    response = http.post(CHAT, json={"model": MODEL, "messages": ASK, **body})
    assert response.status_code == 200, response.text
    payload = response.json()
    validate(payload, "CreateChatCompletionResponse")
    return payload


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_seed_answers_valid_json_for_the_schema(client: openai.OpenAI, name: str) -> None:
    schema = SCHEMAS[name]

    def ask(seed: int):
        return client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=200, temperature=1.0, seed=seed, n=2,
            response_format=json_schema_format(schema),
        )

    with ThreadPoolExecutor(len(SEEDS)) as pool:
        completions = list(pool.map(ask, SEEDS))
    for completion in completions:
        for choice in completion.choices:
            assert choice.finish_reason == "stop", choice
            jsonschema.validate(json.loads(choice.message.content), schema)
            assert " " not in re.sub(r'"(\\.|[^"\\])*"', "", choice.message.content)  # compact: no whitespace


def test_streamed_content_assembles_to_the_same_json(http: httpx.Client) -> None:
    schema = SCHEMAS["nested objects"]
    body = {"model": MODEL, "messages": ASK, "max_tokens": 200, "temperature": 1.0, "seed": 7,
            "response_format": json_schema_format(schema)}
    events = stream(http, CHAT, body)
    assert events[-1] == DONE
    for chunk in events[:-1]:
        validate(chunk, "CreateChatCompletionStreamResponse")
    streamed = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(streamed), schema)
    assert streamed == post(http, **{key: value for key, value in body.items() if key != "messages"})[
        "choices"][0]["message"]["content"]


def token_id(http: httpx.Client, text: str) -> int:
    [token] = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    return token


def test_json_object_answers_are_objects(http: httpx.Client) -> None:
    # The tiny model writes strings without end; a bias toward '"' and '}' lets every object close within max_tokens,
    # so every choice must end with "stop" and a whole object.
    bias = {str(token_id(http, '"')): 30, str(token_id(http, "}")): 30}
    payload = post(http, max_tokens=40, temperature=1.0, seed=3, n=4, response_format={"type": "json_object"},
                   logit_bias=bias)
    assert len(payload["choices"]) == 4
    for choice in payload["choices"]:
        assert choice["finish_reason"] == "stop"
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    text = post(http, max_tokens=8, temperature=1.0, seed=3, response_format={"type": "text"})
    assert text["choices"][0]["message"]["content"] is not None


class Forecast(BaseModel):
    city: str = Field(max_length=8)
    temperature: int = Field(ge=-40, le=50)
    conditions: Literal["sunny", "cloudy", "rainy"]
    # Bounded items: an unbounded integer lets a sampling model write digits until max_tokens.
    hourly: list[Annotated[int, Field(ge=-40, le=50)]] = Field(max_length=3)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Forecast, max_tokens=200, temperature=1.0, seed=0,
    )
    [choice] = completion.choices
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Forecast)
    assert Forecast.model_validate_json(choice.message.content) == choice.message.parsed


@pytest.mark.parametrize("constraint, pattern", [
    ({"regex": r"[A-Z][a-z]{2,5} [0-9]{2}"}, r"[A-Z][a-z]{2,5} [0-9]{2}"),
    ({"choice": ["positive", "negative", "neutral"]}, r"positive|negative|neutral"),
    # Bounded repetition: an unbounded list may run out of max_tokens before its ">".
    ({"grammar": 'start: "<" WORD ("," WORD){0,3} ">"\nWORD: /[a-z]{1,4}/'}, r"<[a-z]{1,4}(,[a-z]{1,4}){0,3}>"),
    ({"json": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
               "additionalProperties": False}}, r'\{"ok":(true|false)\}'),
])
def test_vllm_structured_outputs_on_chat_and_completions(http: httpx.Client, constraint: dict, pattern: str) -> None:
    for seed in range(3):
        chat = post(http, max_tokens=60, temperature=1.0, seed=seed, structured_outputs=constraint)
        assert chat["choices"][0]["finish_reason"] == "stop"
        assert re.fullmatch(pattern, chat["choices"][0]["message"]["content"])
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 60, "temperature": 1.0,
                                                   "seed": 9, "structured_outputs": constraint})
    assert response.status_code == 200, response.text
    validate(response.json(), "CreateCompletionResponse")
    assert re.fullmatch(pattern, response.json()["choices"][0]["text"])


def test_completions_take_response_format(client: openai.OpenAI) -> None:
    schema = SCHEMAS["arrays with bounds and enums"]
    completion = client.completions.create(model=MODEL, prompt="Colors:", max_tokens=200, temperature=1.0, seed=4,
                                           extra_body={"response_format": json_schema_format(schema)})
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].text), schema)


def test_logprobs_are_those_after_the_mask(http: httpx.Client) -> None:
    payload = post(http, max_tokens=5, logprobs=True, top_logprobs=2, structured_outputs={"choice": ["7"]})
    [entry] = payload["choices"][0]["logprobs"]["content"]
    assert entry["token"] == "7" and entry["logprob"] == 0.0
    assert entry["top_logprobs"][1]["logprob"] == -9999.0  # masked: no probability


BAD = {
    "unknown schema type": ({"response_format": json_schema_format({"type": "strng"})}, "response_format"),
    "unsupported string format": ({"response_format": json_schema_format(
        {"type": "string", "format": "credit-card"})}, "response_format"),
    "schema not an object": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
                             "response_format.json_schema.schema"),
    "json_schema without name": ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
                                 "response_format.json_schema.name"),
    "unknown response_format type": ({"response_format": {"type": "xml"}}, "response_format.type"),
    "invalid regex": ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    "invalid grammar": ({"structured_outputs": {"grammar": "start: missing_rule"}}, "structured_outputs"),
    "empty choice": ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    "two structured_outputs": ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    "unknown structured_outputs key": ({"structured_outputs": {"xml": "<a/>"}}, "structured_outputs"),
    "both fields": ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
                    "structured_outputs"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_constraints_get_a_400_naming_them(http: httpx.Client, case: str) -> None:
    fields, param = BAD[case]
    for path, body in ((CHAT, {"messages": ASK}), ("/v1/completions", {"prompt": "x"})):
        response = http.post(path, json={"model": MODEL, "max_tokens": 4, **body, **fields})
        assert response.status_code == 400, response.text
        validate(response.json(), "ErrorResponse")
        assert response.json()["error"]["param"] == param
    assert http.get("/health").json()["status"] == "ok"
    assert post(http, max_tokens=2)["choices"][0]["message"]["content"] is not None


def test_a_constrained_request_leaves_its_unconstrained_neighbours_unchanged(http: httpx.Client) -> None:
    plain = {"max_tokens": 10, "temperature": 0.0, "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    alone = post(http, **plain)["choices"][0]

    def run(body: dict) -> dict:
        return post(http, **body)

    constrained = {"max_tokens": 200, "temperature": 1.0,
                   "response_format": json_schema_format(SCHEMAS["nested objects"])}
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(run, [plain, {**constrained, "seed": 1}, plain, {**constrained, "seed": 2}, plain]))
    for result in results[0::2]:
        assert_same_greedy(result["choices"][0], alone)


def assert_same_greedy(batched: dict, alone: dict) -> None:
    """Equal text; a divergence is only accepted at a near tie of the two best tokens (float summation order)."""
    for got, expected in zip(batched["logprobs"]["content"], alone["logprobs"]["content"]):
        if got["token"] != expected["token"]:
            first, second = expected["top_logprobs"][:2]
            assert first["logprob"] - second["logprob"] < 1e-4, (got, expected)
            return
    assert batched["message"]["content"] == alone["message"]["content"]


def test_a_token_the_grammar_rejects_fails_the_request_and_is_counted() -> None:
    """A fault hook makes every matcher reject its sequence's third token: never a "stop", always an error."""
    with ServerProcess(env={"DOTS_SERVE_FAULT_GRAMMAR_REJECT_AT": "3"}) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        schema = json_schema_format(SCHEMAS["nested objects"])  # no answer completes it in fewer than 3 tokens
        body = {"model": MODEL, "messages": ASK, "response_format": schema, "max_tokens": 40}
        events = stream(http, CHAT, body)
        assert events[-1] == DONE
        validate(events[-2], "ErrorResponse")
        assert "the grammar rejected token" in events[-2]["error"]["message"]
        assert all(choice["finish_reason"] in (None, "error") for chunk in events[:-2] for choice in chunk["choices"])
        response = http.post(CHAT, json=body)
        assert response.status_code == 500
        validate(response.json(), "ErrorResponse")
        assert "the grammar rejected token" in response.json()["error"]["message"]
        free = http.post(CHAT, json={"model": MODEL, "messages": ASK, "max_tokens": 5})  # no grammar: unaffected
        assert free.status_code == 200
        metrics = http.get("/metrics").text
        assert re.search(r"^dots_serve_grammar_rejected_tokens_total\{[^}]*\} 2\.0$", metrics, re.MULTILINE), metrics
