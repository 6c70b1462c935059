"""Responses tools and ``text.format`` as the chat path's tool setup and constraint.

Function tools are flat here (``{"type": "function", "name", "parameters", "strict"}``) and a named choice is
``{"type": "function", "name"}``; both are read by the chat code once reshaped. Hosted tools (web search, file
search, MCP, ...) run on OpenAI's side and do not exist here: refused with a 400, except the ones the Codex CLI sends
with every request, which are left out of the prompt with a log line so that Codex works.
"""
import json
import logging
from typing import Any

from scheduler.structured_output.spec import StructuredOutputSpec
from server.errors import invalid_request
from server.responses.protocol import ResponsesRequest
from server.tools import Tool, ToolSetup, duplicate_name, read_choice, read_function

logger = logging.getLogger(__name__)

ALWAYS_SENT_TOOL_TYPES = ("web_search", "namespace")  # the Codex CLI's, in every request
CHOICE_SHAPE = '\'none\', \'auto\', \'required\' or {"type": "function", "name": ...}'


def response_tool_setup(request: ResponsesRequest) -> ToolSetup:
    tools = []
    for index, tool in enumerate(request.tools or []):
        kind = tool.get("type")
        if kind in ALWAYS_SENT_TOOL_TYPES:
            logger.info("/v1/responses: ignoring the hosted tool tools[%d] of type %r", index, kind)
        elif kind == "function":
            tools.append(read_response_function(tool, index))
        else:
            raise invalid_request(f"tools[{index}].type {kind!r} is not supported; only 'function' tools are "
                                  "(hosted tools such as web search, file search or MCP run on OpenAI's side)",
                                  param=f"tools[{index}].type")
    name = duplicate_name(tools)
    if name is not None:
        raise invalid_request(f"two tools are named {name!r}", param="tools")
    setup = ToolSetup(tools, tools, parallel=request.parallel_tool_calls)
    setup.mode, named = read_choice(chat_choice(request.tool_choice), tools, "tool_choice")
    if named is not None:
        setup.allowed = [tool for tool in tools if tool.name == named]
    return setup


def read_response_function(tool: dict[str, Any], index: int) -> Tool:
    function = {key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}
    return read_function(function, f"tools[{index}]")


def chat_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        if choice not in (None, "none", "auto", "required"):
            raise invalid_request(f"tool_choice must be {CHOICE_SHAPE}, got {choice!r}", param="tool_choice")
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise invalid_request(f"tool_choice must be {CHOICE_SHAPE}; {choice.get('type')!r} choices are not "
                              "supported", param="tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def text_format_spec(text: dict[str, Any] | None) -> StructuredOutputSpec | None:
    """``text.format``: ``{"type": "text"}``, ``{"type": "json_object"}`` or
    ``{"type": "json_schema", "name", "schema", "strict"}``."""
    text_format = (text or {}).get("format")
    if text_format is None:
        return None
    if not isinstance(text_format, dict):
        raise invalid_request("text.format must be an object", param="text.format")
    kind = text_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputSpec("json_object")
    if kind != "json_schema":
        raise invalid_request(f"text.format.type {kind!r} is not supported; use 'text', 'json_object' or "
                              "'json_schema'", param="text.format.type")
    name = text_format.get("name")
    if not isinstance(name, str) or not name:
        raise invalid_request("text.format json_schema needs a 'name'", param="text.format.name")
    schema = text_format.get("schema")
    if not isinstance(schema, dict):
        raise invalid_request("text.format json_schema needs a 'schema' object", param="text.format.schema")
    return StructuredOutputSpec("json_schema", json.dumps(schema))


def echoed_tools(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The function tools as the response object lists them."""
    return [
        {"type": "function", "name": tool["name"], "description": tool.get("description"),
         "parameters": tool.get("parameters"), "strict": tool.get("strict", True)}
        for tool in request.tools or [] if tool.get("type") == "function"
    ]
