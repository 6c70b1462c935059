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
