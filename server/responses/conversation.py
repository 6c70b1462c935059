"""Responses input items as chat messages: the form the chat template renders.

A ``message`` keeps its role (``developer`` renders as system); ``function_call`` items join the assistant message
before them (or start one); ``function_call_output`` is a tool message; ``reasoning`` items are dropped (dots.llm1
does not reason, and the text of another model's reasoning is no prompt for it).
"""
from typing import Any

from pydantic import ValidationError

from server.errors import invalid_request
from server.protocol.chat import ChatMessage, FunctionCall, ToolCall

MESSAGE_ROLES = ("user", "assistant", "system", "developer")
TEXT_PART_TYPES = ("input_text", "output_text", "text")
DROPPED_ITEM_TYPES = ("reasoning",)


def input_messages(items: str | list[dict[str, Any]]) -> list[ChatMessage]:
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    if not items:
        raise invalid_request("input must not be empty", param="input")
    messages: list[ChatMessage] = []
    for index, item in enumerate(items):
        param = f"input[{index}]"
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(message(item, param))
        elif kind == "function_call":
            add_call(messages, function_call(item, param))
        elif kind == "function_call_output":
            messages.append(ChatMessage(role="tool", content=call_output(item, param),
                                        tool_call_id=string_field(item, "call_id", param)))
        elif kind not in DROPPED_ITEM_TYPES:
            raise invalid_request(f"{param}.type {kind!r} is not supported; supported input items: message, "
                                  "function_call, function_call_output, reasoning (ignored)", param=f"{param}.type")
    return messages


def string_field(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise invalid_request(f"{param}.{key} must be a string", param=f"{param}.{key}")
    return value


def text_of(content: Any, param: str) -> str:
    """A string, or text parts (``input_text``; ``output_text`` in earlier assistant turns) joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_request(f"{param} must be a string or a list of content parts", param=param)
    texts = []
    for index, part in enumerate(content):
        part_param = f"{param}[{index}]"
        part_type = part.get("type") if isinstance(part, dict) else None
        if part_type == "refusal":
            continue
        if part_type not in TEXT_PART_TYPES:
            raise invalid_request(f"{part_param}.type {part_type!r} is not supported; this model reads text parts "
                                  "only (input_text, output_text)", param=f"{part_param}.type")
        texts.append(string_field(part, "text", part_param))
    return "\n".join(texts)


def message(item: dict[str, Any], param: str) -> ChatMessage:
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise invalid_request(f"{param}.role must be one of {list(MESSAGE_ROLES)}, got {role!r}", param=f"{param}.role")
    return ChatMessage(role=role, content=text_of(item.get("content"), f"{param}.content"))


def function_call(item: dict[str, Any], param: str) -> ToolCall:
    try:
        function = FunctionCall(name=string_field(item, "name", param),
                                arguments=string_field(item, "arguments", param))
    except ValidationError as error:
        raise invalid_request(f"{param}: {error.errors()[0]['msg']}", param=param) from None
    return ToolCall(id=string_field(item, "call_id", param), function=function)


def call_output(item: dict[str, Any], param: str) -> str:
    output = item.get("output")
    if output is None:
        raise invalid_request(f"{param}.output is required", param=f"{param}.output")
    return text_of(output, f"{param}.output")


def add_call(messages: list[ChatMessage], call: ToolCall) -> None:
    """Calls right after an assistant message (or after other calls) belong to that assistant turn."""
    if messages and messages[-1].role == "assistant":
        messages[-1].tool_calls = [*(messages[-1].tool_calls or []), call]
    else:
        messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))


def output_messages(output: list[dict[str, Any]]) -> list[ChatMessage]:
    """A response's output items as the assistant turn the next request continues from."""
    messages: list[ChatMessage] = []
    for item in output:
        if item["type"] == "message":
            text = "".join(part["text"] for part in item["content"])
            messages.append(ChatMessage(role="assistant", content=text))
        elif item["type"] == "function_call":
            add_call(messages, ToolCall(id=item["call_id"],
                                        function=FunctionCall(name=item["name"], arguments=item["arguments"])))
    return messages
