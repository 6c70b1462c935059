"""POST /v1/responses through the real server and the official openai client: text, the stream's events, text.format,
usage and the prefix cache, instructions and developer messages, truncation, the ignored and echoed fields."""
import json

import httpx
import jsonschema
import openai
import pytest
from conftest import MODEL
from openai_schema import validate_responses
from responses_events import check_events
from sse_events import stream_named

RESPONSES = "/v1/responses"
ANSWER = {"type": "object", "properties": {"book": {"enum": ["Genesis", "Exodus", "Psalms"]},
                                            "chapter": {"type": "integer", "minimum": 1, "maximum": 50}},
          "required": ["book", "chapter"], "additionalProperties": False}
ANSWER_FORMAT = {"type": "json_schema", "name": "answer", "schema": ANSWER, "strict": True}


def post(http: httpx.Client, **body: object) -> dict:
    response = http.post(RESPONSES, json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    payload = response.json()
    validate_responses(payload, "Response")
    return payload


def test_create_with_a_string_input(client: openai.OpenAI, http: httpx.Client) -> None:
    response = client.responses.create(model=MODEL, input="In the beginning", max_output_tokens=12, temperature=0)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert response.output_text == message.content[0].text and response.output_text.strip()
    assert response.usage.output_tokens == 12
    assert response.usage.total_tokens == response.usage.input_tokens + 12
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    again = post(http, input="In the beginning", max_output_tokens=12, temperature=0)
    assert again["output"][0]["content"][0]["text"] == response.output_text  # greedy: the same words


def test_input_items_render_like_chat_messages(http: httpx.Client) -> None:
    """instructions and a developer message are system turns; text parts, earlier assistant turns and reasoning items
    (dropped) render to the same prompt as the chat request with those messages."""
    items = [
        {"type": "message", "role": "developer", "content": "Answer in the words of the King James Bible."},
        {"role": "user", "content": [{"type": "input_text", "text": "Who made the heaven?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thinking"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "God.",
                                                               "annotations": []}]},
        {"role": "user", "content": "And the earth?"},
    ]
    response = post(http, instructions="Be brief.", input=items, max_output_tokens=4, temperature=0)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "system", "content": "Answer in the words of the King James Bible."},
                {"role": "user", "content": "Who made the heaven?"}, {"role": "assistant", "content": "God."},
                {"role": "user", "content": "And the earth?"}]
    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4,
                                                   "temperature": 0}).json()
    assert response["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert response["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]
    assert response["instructions"] == "Be brief."


def test_stream_events_in_order(http: httpx.Client) -> None:
    events = stream_named(http, RESPONSES, {"model": MODEL, "input": "And God said", "max_output_tokens": 16})
    final = check_events(events)
    assert [name for name, _ in events][2:4] == ["response.output_item.added", "response.content_part.added"]
    assert final["status"] == "incomplete" and final["usage"]["output_tokens"] == 16
    assert events[-1][0] == "response.incomplete"


def test_stream_helper_with_json_schema(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="Name a book and chapter.", max_output_tokens=60,
                                 text={"format": ANSWER_FORMAT}) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed"
    assert "".join(deltas) == final.output_text
    jsonschema.validate(json.loads(final.output_text), ANSWER)
    assert final.text.format.type == "json_schema"


def test_text_format_json_schema_and_json_object(client: openai.OpenAI) -> None:
    for seed in range(3):
        response = client.responses.create(model=MODEL, input="Name a book and chapter.", max_output_tokens=60,
                                           temperature=1.0, text={"format": ANSWER_FORMAT},
                                           extra_body={"seed": seed})
        assert response.status == "completed"
        jsonschema.validate(json.loads(response.output_text), ANSWER)
    response = client.responses.create(model=MODEL, input="Answer in JSON.", max_output_tokens=200,
                                       text={"format": {"type": "json_object"}}, temperature=0)
    assert response.status == "completed"
    assert isinstance(json.loads(response.output_text), dict)


def test_cached_tokens_from_the_prefix_cache(client: openai.OpenAI) -> None:
    prompt = "And the LORD spake unto Moses, saying, " * 8
    client.responses.create(model=MODEL, input=prompt, max_output_tokens=2)
    response = client.responses.create(model=MODEL, input=prompt, max_output_tokens=2)
    assert response.usage.input_tokens_details.cached_tokens >= 16


def test_seed_stop_and_echoed_fields(http: httpx.Client) -> None:
    body = {"input": "In the beginning", "max_output_tokens": 24, "temperature": 1.0, "top_p": 0.9, "seed": 7,
            "metadata": {"ticket": "42"}, "user": "alice", "priority": 0, "reasoning": {"effort": "high"},
            "include": ["reasoning.encrypted_content"], "prompt_cache_key": "thread-1", "service_tier": "auto"}
    first, second = post(http, **body), post(http, **body)
    assert first["output"][0]["content"][0]["text"] == second["output"][0]["content"][0]["text"]
    assert first["metadata"] == {"ticket": "42"} and first["user"] == "alice"
    assert first["temperature"] == 1.0 and first["top_p"] == 0.9 and first["max_output_tokens"] == 24
    text = first["output"][0]["content"][0]["text"]
    word = text.split()[1]
    stopped = post(http, **body, stop=[word])
    assert stopped["status"] == "completed"
    assert word not in stopped["output"][0]["content"][0]["text"]
    assert text.startswith(stopped["output"][0]["content"][0]["text"])


def test_truncation(http: httpx.Client) -> None:
    long_turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "And it came to pass " * 60}
                  for i in range(12)]
    items = [*long_turns, {"role": "user", "content": "Amen."}]
    refused = http.post(RESPONSES, json={"model": MODEL, "input": items, "max_output_tokens": 8})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    assert refused.json()["error"]["param"] == "input"
    truncated = post(http, input=items, max_output_tokens=8, truncation="auto", instructions="Be brief.")
    assert truncated["truncation"] == "auto"
    assert 0 < truncated["usage"]["input_tokens"] <= 2048 - 8
    assert truncated["usage"]["output_tokens"] == 8


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": 5000}, "max_output_tokens"),
    ({"input": "hi", "temperature": "hot"}, "temperature"),
    ({"input": []}, "input"),
    ({}, "input"),
    ({"input": "hi", "truncation": "middle"}, "truncation"),
    ({"input": "hi", "priority": 1.5}, "priority"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "schema": ANSWER}}}, "text.format.name"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "nope"}}}},
     "text.format"),
])
def test_bad_input_is_a_400(http: httpx.Client, body: dict, param: str) -> None:
    response = http.post(RESPONSES, json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    validate_responses(response.json(), "ErrorResponse")
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["param"] == param


def test_bad_input_in_a_stream_request_is_a_400_not_a_stream(http: httpx.Client) -> None:
    response = http.post(RESPONSES, json={"model": MODEL, "input": [], "stream": True})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    unknown = http.post(RESPONSES, json={"model": "gpt-5", "input": "hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    not_json = http.post(RESPONSES, content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
