"""An Anthropic Messages request as the chat completions request the chat pipeline runs.

System text becomes one system message; ``tool_use`` blocks become the assistant's ``tool_calls`` (input as JSON
text); each ``tool_result`` becomes a tool message; thinking blocks are dropped. A conversation that ends with an
assistant message is a prefill: the answer continues it.
"""
import json
from typing import Any

from pydantic import ValidationError

from server.anthropic.protocol import (
    InputMessage, MessagesInput, MessagesRequest, TextBlock, ToolChoice, ToolChoiceAny, ToolChoiceNone,
    ToolChoiceTool, ToolResultBlock, ToolUseBlock,
)
from server.errors import from_validation_error
from server.protocol.chat import ChatCompletionRequest, ChatMessage, FunctionCall, ToolCall

# Claude Code's first system block carries a per-request hash that would defeat prefix caching; it is not an
# instruction to the model.
BILLING_HEADER_PREFIX = "x-anthropic-billing-header"
TOOL_ERROR_PREFIX = "Error: "


def system_message(system: str | list[TextBlock] | None) -> list[ChatMessage]:
    if system is None:
        return []
    if isinstance(system, str):
        texts = [system]
    else:
        texts = [block.text for block in system if not block.text.startswith(BILLING_HEADER_PREFIX)]
    text = "\n".join(texts)
    return [ChatMessage(role="system", content=text)] if text else []


def user_messages(message: InputMessage) -> list[ChatMessage]:
    """Tool results as tool messages and runs of text as user messages, in their order."""
    messages: list[ChatMessage] = []
    texts: list[str] = []
    for block in message.blocks():
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolResultBlock):
            if texts:
                messages.append(ChatMessage(role="user", content="\n".join(texts)))
                texts = []
            content = TOOL_ERROR_PREFIX + block.text() if block.is_error else block.text()
            messages.append(ChatMessage(role="tool", content=content, tool_call_id=block.tool_use_id))
    if texts or not messages:
        messages.append(ChatMessage(role="user", content="\n".join(texts)))
    return messages


def assistant_message(message: InputMessage) -> ChatMessage:
    blocks = message.blocks()
    text = "".join(block.text for block in blocks if isinstance(block, TextBlock))
    calls = [
        ToolCall(id=block.id, function=FunctionCall(name=block.name, arguments=json.dumps(block.input)))
        for block in blocks if isinstance(block, ToolUseBlock)
    ]
    return ChatMessage(role="assistant", content=text, tool_calls=calls or None)


def chat_messages(body: MessagesInput) -> list[ChatMessage]:
    messages = system_message(body.system)
    for message in body.messages:
        if message.role == "user":
            messages.extend(user_messages(message))
        else:
            messages.append(assistant_message(message))
    return messages


def chat_tools(body: MessagesInput) -> list[dict[str, Any]] | None:
    if body.tools is None:
        return None
    return [
        {"type": "function", "function": {"name": tool.name, "parameters": tool.input_schema,
                                          **({"description": tool.description} if tool.description else {})}}
        for tool in body.tools
    ]


def chat_tool_choice(choice: ToolChoice | None) -> tuple[str | dict[str, Any] | None, bool]:
    """(OpenAI's tool_choice, parallel_tool_calls)."""
    if choice is None:
        return None, True
    if isinstance(choice, ToolChoiceNone):
        return "none", True
    parallel = not choice.disable_parallel_tool_use
    if isinstance(choice, ToolChoiceAny):
        return "required", parallel
    if isinstance(choice, ToolChoiceTool):
        return {"type": "function", "function": {"name": choice.name}}, parallel
    return "auto", parallel


def is_prefill(body: MessagesInput) -> bool:
    last = body.messages[-1]
    return last.role == "assistant" and not any(isinstance(block, ToolUseBlock) for block in last.blocks())


def conversation_fields(body: MessagesInput) -> dict[str, Any]:
    tool_choice, parallel = chat_tool_choice(body.tool_choice)
    prefill = is_prefill(body)
    return {
        "model": body.model, "messages": chat_messages(body), "tools": chat_tools(body), "tool_choice": tool_choice,
        "parallel_tool_calls": parallel, "add_generation_prompt": not prefill, "continue_final_message": prefill,
    }


def build(fields: dict[str, Any]) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest(**fields)
    except ValidationError as error:
        raise from_validation_error(error) from None


def conversation_request(body: MessagesInput) -> ChatCompletionRequest:
    """The prompt's part of the chat request: messages and tools (what count_tokens renders)."""
    return build(conversation_fields(body))


def generation_request(body: MessagesRequest) -> ChatCompletionRequest:
    return build({
        **conversation_fields(body),
        "max_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
        "stop": body.stop_sequences, "stream": body.stream, "priority": body.priority,
    })
