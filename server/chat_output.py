"""One chat choice's output in OpenAI's shape: plain content, or content and tool calls read by ``ToolCallParser``
(as ``tool_calls``, or the legacy ``function_call`` when the request used ``functions``)."""
from server.tool_parser import ParsedCall, ToolCallDelta, ToolCallParser
from server.tools import ToolSetup


class ChoiceOutput:
    def __init__(self, setup: ToolSetup) -> None:
        self.legacy = setup.legacy
        self.parser = ToolCallParser() if setup.parses_calls else None

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content, tool-call deltas in OpenAI's shape) that ``text`` releases."""
        if self.parser is None:
            return text, []
        content, deltas = self.parser.feed(text)
        return content, self._deltas(deltas)

    def finish(self) -> tuple[str, list[dict]]:
        if self.parser is None:
            return "", []
        content, deltas = self.parser.finish()
        return content, self._deltas(deltas)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        if engine_reason == "stop" and self.calls:
            return "function_call" if self.legacy else "tool_calls"
        return engine_reason

    @property
    def calls(self) -> list[ParsedCall]:
        return self.parser.calls if self.parser is not None else []

    def message(self, text: str) -> dict:
        """The non-streamed ``message`` for the whole ``text``."""
        content, _ = self.feed(text)
        rest, _ = self.finish()
        content += rest
        message = {"role": "assistant", "content": content if content or not self.calls else None, "refusal": None}
        if self.calls and self.legacy:
            message["function_call"] = {"name": self.calls[0].name, "arguments": self.calls[0].arguments}
        elif self.calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in self.calls
            ]
        return message

    def delta(self, content: str, tool_deltas: list[dict]) -> dict:
        """A streamed ``delta`` with ``content`` or with tool-call deltas."""
        if not tool_deltas:
            return {"content": content}
        if self.legacy:
            call = {"arguments": "".join(delta["function"]["arguments"] for delta in tool_deltas)}
            if "id" in tool_deltas[0]:
                call = {"name": tool_deltas[0]["function"]["name"], **call}
            return {"function_call": call}
        return {"tool_calls": tool_deltas}

    def _deltas(self, deltas: list[ToolCallDelta]) -> list[dict]:
        return [delta.to_openai() for delta in deltas]
