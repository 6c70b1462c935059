"""Tools on chat through the real server and the official openai client: required, named, none, auto, one call at
most, streamed tool-call deltas, a follow-up turn with the result, the legacy functions fields, bad tool input."""
import json
import re

import httpx
import jsonschema
import openai
import pytest
from conftest import MODEL
from openai_schema import validate
from sse_events import DONE, stream

CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "What is the weather in Paris, and the time?"}]
UNRELATED = [{"role": "user", "content": "Tell me about the sea."}]
SPECIAL_TOKEN = re.compile(r"<\|[a-z]+\|>")  # the Dots1 chat tokens, as text when special tokens are not skipped
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
SEEDS = range(4)


def post(http: httpx.Client, **body: object) -> dict:
    response = http.post(CHAT, json={"model": MODEL, "messages": ASK, "tools": TOOLS, **body})
    assert response.status_code == 200, response.text
    payload = response.json()
    validate(payload, "CreateChatCompletionResponse")
    return payload


def assert_valid_calls(calls: list, names: set[str]) -> None:
    assert calls
    assert len({call.id for call in calls}) == len(calls)
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_with_one_call_at_most(client: openai.OpenAI) -> None:
    for seed in SEEDS:
        completion = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            max_tokens=120, temperature=1.0, seed=seed,
        )
        [choice] = completion.choices
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        assert_valid_calls(choice.message.tool_calls, set(SCHEMAS))


def test_required_with_parallel_calls(client: openai.OpenAI) -> None:
    # ASK asks two things; the embedded model, trained on two-part questions, calls both tools for it.
    num_calls = []
    for seed in SEEDS:
        [choice] = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, temperature=1.0,
            seed=seed,
        ).choices
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert_valid_calls(choice.message.tool_calls, set(SCHEMAS))
        num_calls.append(len(choice.message.tool_calls))
    assert max(num_calls) >= 2, num_calls


def test_a_named_tool_is_the_one_called(client: openai.OpenAI) -> None:
    for seed in SEEDS:
        [choice] = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, parallel_tool_calls=False, max_tokens=80, temperature=1.0,
            seed=seed, tool_choice={"type": "function", "function": {"name": "get_time"}},
        ).choices
        assert choice.finish_reason == "tool_calls"
        assert_valid_calls(choice.message.tool_calls, {"get_time"})


def test_none_answers_in_text_with_the_tools_in_the_prompt(http: httpx.Client) -> None:
    with_tools = post(http, tool_choice="none", max_tokens=8, temperature=0.0, ignore_eos=True)
    [choice] = with_tools["choices"]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "length"
    assert isinstance(choice["message"]["content"], str)
    without = http.post(CHAT, json={"model": MODEL, "messages": ASK, "max_tokens": 1}).json()
    assert with_tools["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"] + 50  # the tool definitions


def test_auto_leaves_a_text_answer_as_it_is(client: openai.OpenAI) -> None:
    """The embedded model answers a question that fits none of the tools in text (0 of 64 seeds wrote a call when
    measured; it calls a tool for ASK in 61 of 64). Under auto the grammar forbids only a tag that does not open a
    valid call, and special tokens inside the text, so each answer is the text tool_choice "none" gives for the seed
    up to the first special token "none" sampled (seed 1 samples <|response|> mid-text), and it ends. (That a started
    call is then constrained is tested on the grammar itself, in test_tool_units.py.)"""
    for seed in SEEDS:
        answers = {
            choice: client.chat.completions.create(
                model=MODEL, messages=UNRELATED, tools=TOOLS, tool_choice=choice, max_tokens=200, temperature=1.0,
                seed=seed, extra_body={"skip_special_tokens": False},
            ).choices[0]
            for choice in ("auto", "none")
        }
        auto, none = answers["auto"].message.content, answers["none"].message.content
        assert answers["auto"].message.tool_calls is None and answers["auto"].finish_reason == "stop"
        assert auto and "<tool_call>" not in auto and SPECIAL_TOKEN.search(auto) is None
        special = SPECIAL_TOKEN.search(none)
        if special is None:
            assert auto == none
        else:
            assert auto.startswith(none[: special.start()]) and auto != none


def test_streamed_tool_call_deltas_assemble_to_the_same_calls(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 150,
            "temperature": 1.0, "seed": 5}
    events = stream(http, CHAT, body)
    assert events[-1] == DONE
    calls: dict[int, dict] = {}
    for chunk in events[:-1]:
        validate(chunk, "CreateChatCompletionStreamResponse")
        for delta in chunk["choices"][0]["delta"].get("tool_calls") or []:
            if delta["index"] not in calls:
                assert delta["type"] == "function" and delta["id"].startswith("call_") and delta["function"]["name"]
                calls[delta["index"]] = {"name": delta["function"]["name"], "arguments": delta["function"]["arguments"]}
            else:
                assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}
                calls[delta["index"]]["arguments"] += delta["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    collected = post(http, tool_choice="required", max_tokens=150, temperature=1.0, seed=5)["choices"][0]
    assert events[-2]["choices"][0]["finish_reason"] == collected["finish_reason"]
    assert [calls[i] for i in sorted(calls)] == [call["function"] for call in collected["message"]["tool_calls"]]


def test_a_follow_up_turn_renders_the_call_and_its_result(client: openai.OpenAI, http: httpx.Client) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=120,
        temperature=1.0, seed=1,
    ).choices[0].message
    [call] = first.tool_calls
    messages = [*ASK, first.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=6, temperature=0.0)
    assert reply.choices[0].message.content is not None and not reply.choices[0].message.tool_calls
    tokens = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    prompt = http.post("/detokenize", json={"model": MODEL, "tokens": tokens}).json()["prompt"]
    assert f'<tool_call>{{"name":"{call.function.name}","arguments":{call.function.arguments}}}</tool_call>' in prompt
    assert '<tool_response>{"temperature": 21}</tool_response>' in prompt
    assert prompt.endswith("<|response|>")


def test_legacy_functions_map_onto_tools(http: httpx.Client) -> None:
    functions = [tool["function"] for tool in TOOLS]
    body = {"model": MODEL, "messages": ASK, "functions": functions, "function_call": {"name": "get_weather"},
            "max_tokens": 120, "temperature": 1.0, "seed": 2}
    response = http.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    validate(payload, "CreateChatCompletionResponse")
    [choice] = payload["choices"]
    assert choice["finish_reason"] == "function_call"
    call = choice["message"]["function_call"]
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER)
    events = stream(http, CHAT, body)
    streamed = {"name": "", "arguments": ""}
    for chunk in events[:-1]:
        validate(chunk, "CreateChatCompletionStreamResponse")
        delta = chunk["choices"][0]["delta"].get("function_call")
        if delta:
            streamed["name"] += delta.get("name", "")
            streamed["arguments"] += delta["arguments"]
    assert streamed == call
    assert events[-2]["choices"][0]["finish_reason"] == "function_call"
    follow_up = [*ASK, {"role": "assistant", "content": None, "function_call": call},
                 {"role": "function", "name": call["name"], "content": "sunny"}]
    tokens = http.post("/tokenize", json={"model": MODEL, "messages": follow_up}).json()["tokens"]
    prompt = http.post("/detokenize", json={"model": MODEL, "tokens": tokens}).json()["prompt"]
    assert f'{{"name":"get_weather","arguments":{call["arguments"]}}}</tool_call>' in prompt
    assert "<tool_response>sunny</tool_response>" in prompt


BAD = {
    "custom tool type": ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    "tool without a name": ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    "duplicate tool names": ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    "unknown named tool": ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                           "tool_choice"),
    "bad tool_choice": ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    "invalid parameters schema": ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integr"}}}}}]},
        "tools[0].function.parameters"),
    "tools and functions": ({"tools": TOOLS, "functions": [TOOLS[0]["function"]]}, "functions"),
    "tools with a json_schema": ({"tools": TOOLS, "tool_choice": "required",
                                  "response_format": {"type": "json_object"}}, "response_format"),
    "tool message without id": ({"messages": [*ASK, {"role": "tool", "content": "1"}]}, "messages[1]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tool_input_gets_a_400(http: httpx.Client, case: str) -> None:
    fields, param = BAD[case]
    response = http.post(CHAT, json={"model": MODEL, "messages": ASK, "max_tokens": 4, **fields})
    assert response.status_code == 400, response.text
    validate(response.json(), "ErrorResponse")
    assert response.json()["error"]["param"] == param
    assert http.get("/health").json()["status"] == "ok"
