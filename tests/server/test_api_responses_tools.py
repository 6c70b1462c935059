"""Function tools on /v1/responses with the official openai client: forced calls (required, named), streamed
function_call events, a function_call_output follow-up, previous_response_id, GET/DELETE and eviction from the
bounded store, hosted tool types. Calls are forced through tool_choice, never left to the model."""
import json
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from api_server import ServerProcess
from conftest import MODEL
from openai_schema import validate_responses
from responses_events import check_events
from sse_events import stream_named

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                             "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather", "parameters": WEATHER,
          "strict": True},
         {"type": "function", "name": "get_time", "description": "Current time", "parameters": TIME, "strict": True}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = "What is the weather in Paris, and the time?"
STORE_SIZE = 3


@pytest.fixture(scope="module")
def small_store() -> Iterator[ServerProcess]:
    with ServerProcess("--responses-store-size", str(STORE_SIZE)) as process:
        yield process


@pytest.fixture(scope="module")
def client(small_store: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{small_store.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(small_store: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=small_store.url, timeout=60) as http_client:
        yield http_client


def test_required_then_function_call_output(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_output_tokens=120)
    assert response.status == "completed"
    [call] = response.output
    assert call.type == "function_call" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    follow_up = client.responses.create(
        model=MODEL, tools=TOOLS, max_output_tokens=10, tool_choice="none",
        input=[{"role": "user", "content": ASK},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 degrees."}],
    )
    [message] = follow_up.output
    assert message.type == "message" and follow_up.output_text
    assert follow_up.usage.input_tokens > response.usage.input_tokens


def test_named_tool_streamed(http: httpx.Client) -> None:
    events = stream_named(http, "/v1/responses", {
        "model": MODEL, "input": ASK, "tools": TOOLS, "max_output_tokens": 80,
        "tool_choice": {"type": "function", "name": "get_time"}, "parallel_tool_calls": False})
    final = check_events(events)
    assert final["status"] == "completed" and events[-1][0] == "response.completed"
    [call] = final["output"]
    assert call["name"] == "get_time" and call["status"] == "completed"
    jsonschema.validate(json.loads(call["arguments"]), TIME)
    assert final["tool_choice"] == {"type": "function", "name": "get_time"}
    assert [tool["name"] for tool in final["tools"]] == ["get_weather", "get_time"]


def test_previous_response_id_get_delete_and_eviction(client: openai.OpenAI, http: httpx.Client) -> None:
    first = client.responses.create(model=MODEL, input=ASK, tools=TOOLS, tool_choice="required",
                                    parallel_tool_calls=False, max_output_tokens=120)
    [call] = first.output
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=TOOLS, tool_choice="none", max_output_tokens=6,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny."}])
    assert second.previous_response_id == first.id
    # The stored turn (question and call) is in the prompt: as long as sending it all again.
    resent = client.responses.create(
        model=MODEL, tools=TOOLS, tool_choice="none", max_output_tokens=6,
        input=[{"role": "user", "content": ASK},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny."}])
    assert second.usage.input_tokens == resent.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0
    assert client.responses.retrieve(first.id).output[0].call_id == call.call_id
    validate_responses(http.get(f"/v1/responses/{second.id}").json(), "Response")

    deleted = http.delete(f"/v1/responses/{second.id}")
    assert deleted.json() == {"id": second.id, "object": "response", "deleted": True}
    for method in ("GET", "DELETE"):
        missing = http.request(method, f"/v1/responses/{second.id}")
        assert missing.status_code == 404
        validate_responses(missing.json(), "ErrorResponse")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model=MODEL, previous_response_id=second.id, input="And then?")
    assert unknown.value.body["param"] == "previous_response_id"

    not_stored = client.responses.create(model=MODEL, input="Amen.", max_output_tokens=2, store=False)
    assert not_stored.store is False
    assert http.get(f"/v1/responses/{not_stored.id}").status_code == 404
    for _ in range(STORE_SIZE):
        client.responses.create(model=MODEL, input="Amen.", max_output_tokens=2)
    assert http.get(f"/v1/responses/{first.id}").status_code == 404  # least recently used: evicted
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, previous_response_id=first.id, input="And then?")


def test_hosted_tools(http: httpx.Client) -> None:
    """The Codex CLI sends web_search and namespace tools with every request: they are left out; others are 400."""
    body = {"model": MODEL, "input": ASK, "max_output_tokens": 120, "tool_choice": "required",
            "tools": [*TOOLS, {"type": "web_search"}, {"type": "namespace", "name": "agents", "tools": []}]}
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["output"][0]["type"] == "function_call"
    for tool in ({"type": "file_search", "vector_store_ids": ["vs_1"]}, {"type": "mcp", "server_label": "x"},
                 {"type": "custom", "name": "apply_patch"}):
        refused = http.post("/v1/responses", json={"model": MODEL, "input": ASK, "tools": [*TOOLS, tool]})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "tools[2].type"
        assert repr(tool["type"]) in refused.json()["error"]["message"]


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
    ({"tools": [{"type": "function", "name": "f", "parameters": "x"}]}, "tools[0].parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "web_search"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tools": TOOLS, "text": {"format": {"type": "json_object"}}}, "text.format"),
])
def test_bad_tools_are_a_400(http: httpx.Client, body: dict, param: str) -> None:
    response = http.post("/v1/responses", json={"model": MODEL, "input": ASK, **body})
    assert response.status_code == 400, response.text
    validate_responses(response.json(), "ErrorResponse")
    assert response.json()["error"]["param"] == param
