"""Reads an SSE response the way a strict client does: every event is ``data: <json>`` or ``data: [DONE]``."""
import json
from collections.abc import Iterator
from typing import Any

import httpx

DONE = "[DONE]"


def parse_events(lines: Iterator[str]) -> Iterator[Any]:
    for line in lines:
        if not line or line.startswith(":"):  # blank separators and keep-alive comments
            continue
        assert line.startswith("data: "), f"unexpected SSE line {line!r}"
        data = line.removeprefix("data: ")
        yield DONE if data == DONE else json.loads(data)


def stream(http: httpx.Client, path: str, body: dict, headers: dict[str, str] | None = None) -> list[Any]:
    """All events of a streaming request, ``[DONE]`` included."""
    with http.stream("POST", path, json={**body, "stream": True}, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(parse_events(response.iter_lines()))


def parse_named_events(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """``event: <name>`` / ``data: <json>`` pairs (the Responses API's framing), as (name, payload)."""
    name = None
    for line in lines:
        if not line or line.startswith(":"):
            continue
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
            continue
        assert line.startswith("data: ") and name is not None, f"unexpected SSE line {line!r}"
        yield name, json.loads(line.removeprefix("data: "))
        name = None


def stream_named(http: httpx.Client, path: str, body: dict) -> list[tuple[str, Any]]:
    """All (name, payload) events of a streaming request with named events."""
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(parse_named_events(response.iter_lines()))
