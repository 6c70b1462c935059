"""Checks a Responses event stream the way OpenAI sends it: schema of every event, sequence numbers, item order."""
from typing import Any

from openai_schema import validate_responses

EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
}
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def check_events(events: list[tuple[str, Any]]) -> dict:
    """Validates every event and their order; returns the final response."""
    names = [name for name, _ in events]
    for name, payload in events:
        assert payload["type"] == name
        validate_responses(payload, EVENT_SCHEMAS[name])
    assert [payload["sequence_number"] for _, payload in events] == list(range(len(events)))
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] in TERMINAL and not any(name in TERMINAL for name in names[:-1])
    final = events[-1][1]["response"]
    validate_responses(final, "Response")
    ids = {events[0][1]["response"]["id"], events[1][1]["response"]["id"], final["id"]}
    assert len(ids) == 1
    for index, item in enumerate(final["output"]):
        item_events = [(name, payload) for name, payload in events if payload.get("output_index") == index]
        assert item_events[0][0] == "response.output_item.added"
        assert item_events[-1] == ("response.output_item.done", item_events[-1][1])
        assert item_events[-1][1]["item"] == item
        if item["type"] == "message":
            deltas = "".join(payload["delta"] for name, payload in item_events if name == "response.output_text.delta")
            assert deltas == item["content"][0]["text"]
            assert [name for name, _ in item_events if "delta" not in name] == [
                "response.output_item.added", "response.content_part.added", "response.output_text.done",
                "response.content_part.done", "response.output_item.done"]
        else:
            deltas = "".join(payload["delta"] for name, payload in item_events
                             if name == "response.function_call_arguments.delta")
            assert deltas == item["arguments"]
            assert [name for name, _ in item_events if "delta" not in name] == [
                "response.output_item.added", "response.function_call_arguments.done", "response.output_item.done"]
    return final
