"""Reads the assistant's tool calls out of its text, incrementally, as OpenAI's streamed tool-call deltas.

Text before the first ``<tool_call>`` is content. A call's id, type and name go out as soon as its
``{"name":...,"arguments":`` header is complete, then its arguments in fragments; the call's closing ``}`` and the
tag are held back until seen, so the fragments concatenate to exactly the arguments' JSON text. Collecting a whole
response goes through the same parser, so a streamed call assembles to the non-streamed one.
"""
import json
import re
import uuid
from dataclasses import dataclass, field

from server.tool_format import CALL_CLOSE, CALL_OPEN

HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # with the name, in the first delta of a call
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict:
        delta: dict = {"index": self.index}
        if self.id is not None:
            delta.update(id=self.id, type="function", function={"name": self.name, "arguments": self.arguments})
        else:
            delta["function"] = {"arguments": self.arguments}
        return delta


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


def held_tag_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag`` (it may become the tag)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


@dataclass
class ToolCallParser:
    buffer: str = ""  # text not consumed yet
    in_call: bool = False
    call: ParsedCall | None = None  # the call being read, once its header is complete
    sent_arguments: int = 0  # characters of the current call's arguments already sent
    calls: list[ParsedCall] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """New text in; (content to send, tool-call deltas to send) out."""
        self.buffer += text
        content, deltas = "", []
        while True:
            if not self.in_call:
                at = self.buffer.find(CALL_OPEN)
                if at == -1:
                    keep = held_tag_prefix(self.buffer, CALL_OPEN)
                    content += self._outside(self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return content, deltas
                content += self._outside(self.buffer[:at])
                self.buffer = self.buffer[at + len(CALL_OPEN) :]
                self.in_call = True
                continue
            end = self.buffer.find(CALL_CLOSE)
            body = self.buffer if end == -1 else self.buffer[:end]
            if self.call is None:
                header = HEADER.match(body)
                if header is not None:
                    self._start_call(json.loads(f'"{header.group(1)}"'))
                    deltas.append(ToolCallDelta(len(self.calls) - 1, self.call.id, self.call.name))
                    self.buffer = self.buffer[header.end() :]
                    continue
            if end == -1:
                if self.call is not None:
                    deltas.extend(self._send_arguments(self._arguments_so_far(body)))
                return content, deltas
            deltas.extend(self._close_call(body))
            self.buffer = self.buffer[end + len(CALL_CLOSE) :]

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """At the end of the output: whatever was held back (an unfinished call keeps what it has)."""
        rest, self.buffer = self.buffer, ""
        if not self.in_call:
            return self._outside(rest), []
        if self.call is None:
            return CALL_OPEN + rest, []  # never became a call
        return "", self._send_arguments(rest)

    def _outside(self, text: str) -> str:
        """Text outside calls is content, except whitespace between and after calls, which is dropped."""
        if self.calls and not text.strip():
            return ""
        return text

    def _start_call(self, name: str) -> None:
        self.call = ParsedCall(f"call_{uuid.uuid4().hex[:24]}", name)
        self.calls.append(self.call)
        self.sent_arguments = 0

    def _arguments_so_far(self, body: str) -> str:
        """The part of ``body`` that is surely arguments: not the tail that may be the call's ``}`` and the tag."""
        safe = body[: len(body) - held_tag_prefix(body, CALL_CLOSE)].rstrip()
        return safe[:-1].rstrip() if safe.endswith("}") else safe

    def _send_arguments(self, arguments: str) -> list[ToolCallDelta]:
        fragment = arguments[self.sent_arguments :]
        if not fragment:
            return []
        self.sent_arguments = len(arguments)
        self.call.arguments = arguments
        return [ToolCallDelta(len(self.calls) - 1, arguments=fragment)]

    def _close_call(self, body: str) -> list[ToolCallDelta]:
        self.in_call = False
        if self.call is not None:
            deltas = self._send_arguments(self._arguments_so_far(body))
            self.call = None
            return deltas
        try:  # a call whose header was not in the expected order: read it whole
            parsed = json.loads(body)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
            return []
        self._start_call(parsed["name"])
        arguments = parsed.get("arguments", {})
        deltas = [ToolCallDelta(len(self.calls) - 1, self.call.id, self.call.name)]
        deltas.extend(self._send_arguments(arguments if isinstance(arguments, str) else json.dumps(arguments)))
        self.call = None
        return deltas
