"""Validates Messages API replies against the subset of Anthropic's published schemas in
``anthropic-messages-schema-subset.json``, and reads Anthropic's SSE frames strictly."""
import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
from jsonschema import Draft202012Validator

SUBSET = Path(__file__).resolve().parent / "anthropic-messages-schema-subset.json"
EVENT_SCHEMAS = {
    "message_start": "MessageStartEvent", "content_block_start": "ContentBlockStartEvent",
    "content_block_delta": "ContentBlockDeltaEvent", "content_block_stop": "ContentBlockStopEvent",
    "message_delta": "MessageDeltaEvent", "message_stop": "MessageStopEvent", "ping": "PingEvent",
    "error": "ErrorEvent",
}


@lru_cache(maxsize=None)
def validator(schema_name: str) -> Draft202012Validator:
    schemas = json.loads(SUBSET.read_text())["components"]["schemas"]
    if schema_name not in schemas:
        raise KeyError(f"{schema_name} is not in the schema subset")
    return Draft202012Validator({"components": {"schemas": schemas}, "$ref": f"#/components/schemas/{schema_name}"})


def validate(instance: Any, schema_name: str) -> None:
    validator(schema_name).validate(instance)


def parse_events(lines: Iterator[str]) -> Iterator[dict]:
    """Each frame is ``event: <type>`` then ``data: <json>`` whose ``type`` is the event's name."""
    name = None
    for line in lines:
        if not line:
            assert name is None, f"event {name!r} without data"
            continue
        if line.startswith("event: "):
            assert name is None, f"two event lines: {name!r}, {line!r}"
            name = line.removeprefix("event: ")
            continue
        assert line.startswith("data: ") and name is not None, f"unexpected SSE line {line!r}"
        payload = json.loads(line.removeprefix("data: "))
        assert payload["type"] == name, (name, payload)
        validate(payload, EVENT_SCHEMAS[name])
        yield payload
        name = None


def stream_events(http: httpx.Client, body: dict, headers: dict[str, str] | None = None) -> list[dict]:
    with http.stream("POST", "/v1/messages", json={**body, "stream": True}, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["request-id"]
        return list(parse_events(response.iter_lines()))
