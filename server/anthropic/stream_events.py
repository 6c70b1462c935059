"""One answer as Anthropic's stream events: ``message_start``, then per content block ``content_block_start``,
``content_block_delta`` (``text_delta`` or ``input_json_delta``) and ``content_block_stop``, then ``message_delta``
(stop reason, usage) and ``message_stop``. Each is an SSE frame ``event: <type>`` / ``data: <json>``.

A text block opens when text arrives and a tool_use block when a call's name is known; each closes when the next
opens or the answer ends. A call's ``partial_json`` fragments concatenate to its input's JSON text.
"""
from typing import Any

from sse_starlette import ServerSentEvent

from server.anthropic.message_output import text_block, tool_use_id
from server.streaming import encode_json
from server.tool_parser import ToolCallDelta, ToolCallParser
from server.tools import ToolSetup

PING_DATA = '{"type":"ping"}'


def event(kind: str, payload: dict[str, Any] | None = None) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + encode_json({"type": kind, **(payload or {})}) + b"\n\n"


def ping_event() -> ServerSentEvent:
    """The keep-alive sent while the stream is quiet."""
    return ServerSentEvent(event="ping", data=PING_DATA, sep="\n")


class MessageEvents:
    def __init__(self, setup: ToolSetup) -> None:
        self.parser = ToolCallParser() if setup.parses_calls else None
        self.index = -1  # the open block's index
        self.open_type: str | None = None  # "text", "tool_use", or None between blocks

    @property
    def called_tools(self) -> bool:
        return self.parser is not None and bool(self.parser.calls)

    def start(self, message: dict[str, Any]) -> bytes:
        return event("message_start", {"message": message}) + event("ping")

    def feed(self, text: str) -> bytes:
        if self.parser is None:
            return self.text(text)
        content, deltas = self.parser.feed(text)
        return self.text(content) + self.calls(deltas)

    def flush(self) -> bytes:
        """At the end of the answer: what the parser held back."""
        if self.parser is None:
            return b""
        content, deltas = self.parser.finish()
        return self.text(content) + self.calls(deltas)

    def end(self, stop: tuple[str, str | None], usage: dict[str, Any]) -> bytes:
        """The last block's stop, ``message_delta`` and ``message_stop``."""
        stop_reason, stop_sequence = stop
        delta = {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}, "usage": usage}
        return self.close() + event("message_delta", delta) + event("message_stop")

    def text(self, text: str) -> bytes:
        if not text:
            return b""
        opened = self.open(text_block("")) if self.open_type != "text" else b""
        return opened + event("content_block_delta",
                              {"index": self.index, "delta": {"type": "text_delta", "text": text}})

    def calls(self, deltas: list[ToolCallDelta]) -> bytes:
        events = b""
        for delta in deltas:
            if delta.id is not None:
                events += self.open({"type": "tool_use", "id": tool_use_id(delta.id), "name": delta.name,
                                     "input": {}})
            if delta.arguments:
                events += event("content_block_delta", {
                    "index": self.index, "delta": {"type": "input_json_delta", "partial_json": delta.arguments}
                })
        return events

    def open(self, block: dict[str, Any]) -> bytes:
        events = self.close()
        self.index += 1
        self.open_type = block["type"]
        return events + event("content_block_start", {"index": self.index, "content_block": block})

    def close(self) -> bytes:
        if self.open_type is None:
            return b""
        self.open_type = None
        return event("content_block_stop", {"index": self.index})
