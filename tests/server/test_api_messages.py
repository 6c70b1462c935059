"""Anthropic's Messages API through the real server and the official anthropic client: create, stream (events in
order, deltas equal to the final message), stop sequences, tool_use then tool_result, count_tokens, the fields
accepted and ignored; every reply validated against Anthropic's published schemas (anthropic_schema.py)."""
import json

import anthropic
import httpx
import jsonschema
import pytest
from anthropic_schema import stream_events, validate
from api_server import ServerProcess
from conftest import MODEL

ASK = [{"role": "user", "content": "And God said, Let there be light"}]
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["zone"],
        "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"name": "get_time", "description": "Current time", "input_schema": TIME},
         {"name": "get_weather", "description": "Current weather", "input_schema": WEATHER}]
SCHEMAS = {"get_time": TIME, "get_weather": WEATHER}
ONE_CALL = {"type": "any", "disable_parallel_tool_use": True}
GREEDY = {"temperature": 0.0}  # the SDK's create() no longer names the sampling fields; the API still takes them


@pytest.fixture(scope="module")
def claude(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def create(http: httpx.Client, **body: object) -> dict:
    response = http.post("/v1/messages", json={"model": MODEL, "messages": ASK, "temperature": 0.0, **body})
    assert response.status_code == 200, response.text
    assert response.headers["request-id"]
    payload = response.json()
    validate(payload, "Message")
    return payload


def text_of(message: dict) -> str:
    return "".join(block["text"] for block in message["content"] if block["type"] == "text")


def test_create(claude: anthropic.Anthropic, http: httpx.Client) -> None:
    message = claude.messages.create(model=MODEL, max_tokens=12, messages=ASK, system="Answer in the words of the King",
                                     extra_body=GREEDY)
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.id.startswith("msg_")
    [block] = message.content
    assert block.type == "text" and block.text
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.output_tokens == 12
    assert message.usage.cache_creation_input_tokens == 0
    raw = create(http, max_tokens=12, system=[{"type": "text", "text": "Answer in the words of the King"}])
    assert text_of(raw) == block.text  # a system string and a system text block render alike; greedy is repeatable
    assert raw["usage"]["input_tokens"] + raw["usage"]["cache_read_input_tokens"] == (
        message.usage.input_tokens + message.usage.cache_read_input_tokens)


def test_the_prefix_cache_shows_as_cache_reads(http: httpx.Client) -> None:
    long_ask = [{"role": "user", "content": "In the beginning God created the heaven and the earth. " * 12}]
    first = create(http, max_tokens=2, messages=long_ask)["usage"]
    second = create(http, max_tokens=2, messages=long_ask)["usage"]
    assert second["cache_read_input_tokens"] > 0
    assert second["input_tokens"] < first["input_tokens"] + first["cache_read_input_tokens"]
    assert second["input_tokens"] + second["cache_read_input_tokens"] == (
        first["input_tokens"] + first["cache_read_input_tokens"])


def test_a_stop_sequence_is_named(http: httpx.Client) -> None:
    free = text_of(create(http, max_tokens=24))
    words = free.split()
    assert len(words) > 3, free
    stop = words[2]
    stopped = create(http, max_tokens=24, stop_sequences=["no such text", stop])
    assert stopped["stop_reason"] == "stop_sequence" and stopped["stop_sequence"] == stop
    assert text_of(stopped) == free[: free.index(stop)]


def test_stream_events_in_order(claude: anthropic.Anthropic, http: httpx.Client) -> None:
    events = stream_events(http, {"model": MODEL, "messages": ASK, "max_tokens": 16, "temperature": 0.0})
    kinds = [event["type"] for event in events if event["type"] != "ping"]
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["id"].startswith("msg_")
    streamed = "".join(event["delta"]["text"] for event in events if event["type"] == "content_block_delta")
    delta = next(event for event in events if event["type"] == "message_delta")
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 16
    assert streamed == text_of(create(http, max_tokens=16))

    with claude.messages.stream(model=MODEL, max_tokens=16, messages=ASK, extra_body=GREEDY) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == final.content[0].text == streamed
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 16


def test_a_stream_that_stops_on_a_sequence(http: httpx.Client) -> None:
    free = text_of(create(http, max_tokens=24))
    stop = free.split()[2]
    events = stream_events(http, {"model": MODEL, "messages": ASK, "max_tokens": 24, "temperature": 0.0,
                                  "stop_sequences": [stop]})
    delta = next(event for event in events if event["type"] == "message_delta")["delta"]
    assert delta == {"stop_reason": "stop_sequence", "stop_sequence": stop}
    streamed = "".join(event["delta"]["text"] for event in events if event["type"] == "content_block_delta")
    assert streamed == free[: free.index(stop)]


def assert_one_call(message: anthropic.types.Message, name: str | None = None) -> anthropic.types.ToolUseBlock:
    assert message.stop_reason == "tool_use"
    [call] = [block for block in message.content if block.type == "tool_use"]
    assert call.id.startswith("toolu_") and call.name in SCHEMAS
    assert name is None or call.name == name
    jsonschema.validate(call.input, SCHEMAS[call.name])
    return call


def test_tool_use_then_tool_result(claude: anthropic.Anthropic, http: httpx.Client) -> None:
    question = [{"role": "user", "content": "What time is it?"}]
    message = claude.messages.create(model=MODEL, max_tokens=80, messages=question, tools=TOOLS, tool_choice=ONE_CALL)
    call = assert_one_call(message)
    raw = create(http, max_tokens=80, messages=question, tools=TOOLS, tool_choice=ONE_CALL)
    assert raw["stop_reason"] == "tool_use"

    history = [*question, {"role": "assistant", "content": [block.model_dump() for block in message.content]}]
    for result in ("12:00", [{"type": "text", "text": "12:00"}, {"type": "text", "text": "noon"}]):
        for is_error in (False, True):
            follow_up = [*history, {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": result, "is_error": is_error},
                {"type": "text", "text": "And so?"},
            ]}]
            answer = claude.messages.create(model=MODEL, max_tokens=8, messages=follow_up, tools=TOOLS,
                                            tool_choice={"type": "none"})
            assert answer.stop_reason in ("end_turn", "max_tokens")
            assert [block.type for block in answer.content] == ["text"]
            with_result = claude.messages.count_tokens(model=MODEL, messages=follow_up, tools=TOOLS).input_tokens
            without = claude.messages.count_tokens(model=MODEL, messages=history, tools=TOOLS).input_tokens
            assert with_result > without


def test_a_named_tool_is_the_one_called(claude: anthropic.Anthropic) -> None:
    for name in SCHEMAS:
        message = claude.messages.create(model=MODEL, max_tokens=80, messages=ASK, tools=TOOLS,
                                         tool_choice={"type": "tool", "name": name, "disable_parallel_tool_use": True})
        assert_one_call(message, name)


def test_streamed_tool_use(claude: anthropic.Anthropic, http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 80, "temperature": 0.0, "tools": TOOLS,
            "tool_choice": ONE_CALL}
    events = stream_events(http, body)
    [start] = [event for event in events if event["type"] == "content_block_start"]
    block = start["content_block"]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_") and block["input"] == {}
    partial = "".join(event["delta"]["partial_json"] for event in events if event["type"] == "content_block_delta")
    streamed_input = json.loads(partial)
    jsonschema.validate(streamed_input, SCHEMAS[block["name"]])
    assert next(event for event in events if event["type"] == "message_delta")["delta"]["stop_reason"] == "tool_use"
    collected = create(http, max_tokens=80, tools=TOOLS, tool_choice=ONE_CALL)
    [collected_call] = collected["content"]
    assert (collected_call["name"], collected_call["input"]) == (block["name"], streamed_input)

    with claude.messages.stream(model=MODEL, max_tokens=80, messages=ASK, extra_body=GREEDY, tools=TOOLS,
                                tool_choice=ONE_CALL) as stream:
        final = stream.get_final_message()
    assert assert_one_call(final).input == streamed_input


def test_count_tokens(claude: anthropic.Anthropic, http: httpx.Client) -> None:
    counted = claude.messages.count_tokens(model=MODEL, messages=ASK, system="Be brief")
    usage = create(http, max_tokens=1, system="Be brief")["usage"]
    assert counted.input_tokens == usage["input_tokens"] + usage["cache_read_input_tokens"]
    with_tools = claude.messages.count_tokens(model=MODEL, messages=ASK, system="Be brief", tools=TOOLS)
    assert with_tools.input_tokens > counted.input_tokens
    usage = create(http, max_tokens=1, system="Be brief", tools=TOOLS, tool_choice={"type": "auto"})["usage"]
    assert with_tools.input_tokens == usage["input_tokens"] + usage["cache_read_input_tokens"]
    response = http.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": ASK})
    validate(response.json(), "MessageTokensCount")
    assert response.headers["request-id"]


def test_fields_accepted_and_ignored(claude: anthropic.Anthropic, http: httpx.Client) -> None:
    """thinking (params and blocks), metadata, cache_control, service_tier, priority, the beta header and query."""
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Who spoke?", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "c2ln"},
                                          {"type": "redacted_thinking", "data": "eA=="},
                                          {"type": "text", "text": "God."}]},
        {"role": "user", "content": "And then?"},
    ]
    message = claude.messages.create(
        model=MODEL, max_tokens=4, messages=history, metadata={"user_id": "u-1"}, service_tier="auto",
        thinking={"type": "enabled", "budget_tokens": 1024}, extra_body={"priority": 0, "top_k": 5, "top_p": 0.9},
        extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
    )
    assert [block.type for block in message.content] == ["text"]  # no thinking blocks: dots.llm1 does not reason
    response = http.post("/v1/messages?beta=true", json={"model": MODEL, "messages": ASK, "max_tokens": 2},
                         headers={"anthropic-version": "2023-06-01", "anthropic-beta": "a,b"})
    assert response.status_code == 200, response.text
    validate(response.json(), "Message")


def test_an_assistant_prefill_is_continued(http: httpx.Client) -> None:
    free = text_of(create(http, max_tokens=16))
    prefix = " ".join(free.split()[:3])
    prefill = [*ASK, {"role": "assistant", "content": prefix}]
    continued = create(http, max_tokens=6, messages=prefill)
    assert text_of(continued) and free.startswith(prefix + text_of(continued))  # the answer goes on from the prefix
    counted = http.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": prefill}).json()
    usage = continued["usage"]
    assert counted["input_tokens"] == usage["input_tokens"] + usage["cache_read_input_tokens"]
