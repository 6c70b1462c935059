"""The model's text as Responses output items (``message`` with ``output_text``, ``function_call``), and the stream
events that open, extend and close them. A whole response and a stream are built the same way, so they agree."""
import uuid
from typing import Any

from server.responses.events import EventEncoder
from server.tool_parser import ToolCallDelta, ToolCallParser
from server.tools import ToolSetup


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class OutputItems:
    def __init__(self, setup: ToolSetup, events: EventEncoder) -> None:
        self.parser = ToolCallParser() if setup.parses_calls else None
        self.events = events
        self.items: list[dict[str, Any]] = []
        self.message: dict[str, Any] | None = None  # the open message item
        self.text = ""  # of the open message
        self.call: dict[str, Any] | None = None  # the open function_call item

    def feed(self, text: str) -> list[bytes]:
        """The events that ``text`` releases."""
        if self.parser is None:
            return self.add_text(text)
        content, deltas = self.parser.feed(text)
        return self.add_text(content) + self.add_calls(deltas)

    def finish(self, status: str) -> list[bytes]:
        """Whatever the parser held back, then every open item closed with ``status`` (``completed`` or
        ``incomplete``); a response that said nothing gets an empty message."""
        events = []
        if self.parser is not None:
            content, deltas = self.parser.finish()
            events = self.add_text(content) + self.add_calls(deltas)
        if not self.items:
            events += self.open_message()
        return events + self.close_message(status) + self.close_call(status)

    @property
    def output_index(self) -> int:
        return len(self.items) - 1

    def add_text(self, text: str) -> list[bytes]:
        if not text:
            return []
        events = self.close_call("completed")
        if self.message is None:
            events += self.open_message()
        self.text += text
        events.append(self.events.event("response.output_text.delta", item_id=self.message["id"],
                                        output_index=self.output_index, content_index=0, delta=text, logprobs=[]))
        return events

    def add_calls(self, deltas: list[ToolCallDelta]) -> list[bytes]:
        events = []
        for delta in deltas:
            if delta.id is not None:
                events += self.close_message("completed") + self.close_call("completed")
                self.call = {"id": item_id("fc"), "type": "function_call", "status": "in_progress",
                             "call_id": delta.id, "name": delta.name, "arguments": ""}
                self.items.append(self.call)
                events.append(self.events.event("response.output_item.added", output_index=self.output_index,
                                                item=self.call))
            if delta.arguments:
                self.call["arguments"] += delta.arguments
                events.append(self.events.event("response.function_call_arguments.delta", item_id=self.call["id"],
                                                output_index=self.output_index, delta=delta.arguments))
        return events

    def open_message(self) -> list[bytes]:
        self.message = {"id": item_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                        "content": []}
        self.text = ""
        self.items.append(self.message)
        return [
            self.events.event("response.output_item.added", output_index=self.output_index, item=self.message),
            self.events.event("response.content_part.added", item_id=self.message["id"],
                              output_index=self.output_index, content_index=0, part=text_part("")),
        ]

    def close_message(self, status: str) -> list[bytes]:
        if self.message is None:
            return []
        message, self.message = self.message, None
        index = self.items.index(message)
        part = text_part(self.text)
        message.update(status=status, content=[part])
        return [
            self.events.event("response.output_text.done", item_id=message["id"], output_index=index,
                              content_index=0, text=self.text, logprobs=[]),
            self.events.event("response.content_part.done", item_id=message["id"], output_index=index,
                              content_index=0, part=part),
            self.events.event("response.output_item.done", output_index=index, item=message),
        ]

    def close_call(self, status: str) -> list[bytes]:
        if self.call is None:
            return []
        call, self.call = self.call, None
        index = self.items.index(call)
        call["status"] = status
        return [
            self.events.event("response.function_call_arguments.done", item_id=call["id"], output_index=index,
                              name=call["name"], arguments=call["arguments"]),
            self.events.event("response.output_item.done", output_index=index, item=call),
        ]
