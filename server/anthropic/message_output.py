"""The assistant's answer in Anthropic's shapes: content blocks, stop reason, usage, the message object.

Tool calls are read by the chat path's ``ToolCallParser``; their ids become ``toolu_...`` and their arguments the
``input`` object. Token counts follow Anthropic's split: ``input_tokens`` are the prompt tokens not read from the
prefix cache, ``cache_read_input_tokens`` those that were (their sum is the prompt).
"""
import json
from typing import Any

from server.errors import APIError
from server.tool_parser import ParsedCall, ToolCallParser
from server.tools import ToolSetup


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def tool_input(arguments: str) -> dict[str, Any]:
    """The call's arguments as an object; a call cut short (max_tokens) has none that parse."""
    try:
        parsed = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text, "citations": None}


def tool_use_block(call: ParsedCall, with_input: bool = True) -> dict[str, Any]:
    """``with_input=False``: the block as a stream opens it, its input then arriving as JSON deltas."""
    return {"type": "tool_use", "id": tool_use_id(call.id), "name": call.name,
            "input": tool_input(call.arguments) if with_input else {}}


def content_blocks(text: str, setup: ToolSetup) -> list[dict[str, Any]]:
    """The whole answer's blocks: its text (if any), then its tool calls."""
    if not setup.parses_calls:
        return [text_block(text)] if text else []
    parser = ToolCallParser()
    content, _ = parser.feed(text)
    rest, _ = parser.finish()
    content += rest
    return ([text_block(content)] if content else []) + [tool_use_block(call) for call in parser.calls]


def stop_fields(
    finish_reason: str | None, matched_stop: int | str | None, called_tools: bool, stop_sequences: list[str] | None
) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) from the engine's finish reason and the stop string it matched."""
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "abort":
        raise APIError(503, "The request was aborted: the server is shutting down.", code="server_draining")
    if called_tools:
        return "tool_use", None
    if isinstance(matched_stop, str) and matched_stop in (stop_sequences or []):
        return "stop_sequence", matched_stop
    return "end_turn", None


def usage(prompt_tokens: int, output_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens - cached_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached_tokens,
        "cache_creation": None,
        "server_tool_use": None,
        "service_tier": "standard",
    }


def message(
    message_id: str, model: str, content: list[dict[str, Any]], stop: tuple[str | None, str | None],
    message_usage: dict[str, Any],
) -> dict[str, Any]:
    stop_reason, stop_sequence = stop
    return {
        "id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": message_usage, "container": None,
    }
