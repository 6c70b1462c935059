"""OpenAI tools on chat: the request's tools and tool_choice (or the legacy functions and function_call), and the
constraint that makes the model's calls match them.

A call is ``<tool_call>{"name":NAME,"arguments":{...}}</tool_call>`` (the format of the shipped template, in
``tool_format.py``, which also builds its grammar).
``required`` and named choices allow only calls; ``auto`` allows text that may turn into calls at the tag, after
which only calls follow; ``parallel_tool_calls: false`` allows one call.
"""
import json
import re
from dataclasses import dataclass, field
from typing import Any

from scheduler.structured_output.spec import StructuredOutputSpec
from scheduler.structured_output.validator import ConstraintValidator
from server.errors import invalid_request
from server.protocol.chat import ChatCompletionRequest
from server.structured_outputs import validate_or_400
from server.tool_format import tool_call_grammar

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass
class Tool:
    name: str
    parameters: dict[str, Any]
    definition: dict[str, Any]  # as the template renders it: {"type": "function", "function": {...}}
    param: str  # where it came from in the request, for errors


@dataclass
class ToolSetup:
    tools: list[Tool] = field(default_factory=list)  # shown to the model
    allowed: list[Tool] = field(default_factory=list)  # callable under tool_choice
    mode: str = "none"  # none, auto, required, named
    parallel: bool = True
    legacy: bool = False  # functions/function_call: answered with message.function_call

    @property
    def parses_calls(self) -> bool:
        return self.mode != "none" and bool(self.allowed)

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [tool.definition for tool in self.tools] or None


def parse_tools(request: ChatCompletionRequest) -> ToolSetup:
    if request.functions is not None or request.function_call is not None:
        if request.tools is not None or request.tool_choice is not None:
            raise invalid_request("give tools/tool_choice or the legacy functions/function_call, not both",
                                  param="functions")
        tools = [read_function(function, f"functions[{i}]") for i, function in enumerate(request.functions or [])]
        choice = request.function_call
        if isinstance(choice, dict):
            choice = {"type": "function", "function": choice}
        setup = ToolSetup(tools, tools, parallel=False, legacy=True)
        setup.mode, named = read_choice(choice, tools, "function_call")
    else:
        tools = [read_tool(tool, i) for i, tool in enumerate(request.tools or [])]
        setup = ToolSetup(tools, tools, parallel=request.parallel_tool_calls)
        setup.mode, named = read_choice(request.tool_choice, tools, "tool_choice")
    if named is not None:
        setup.allowed = [tool for tool in tools if tool.name == named]  # the template still shows every tool
    duplicate = duplicate_name(tools)
    if duplicate is not None:
        raise invalid_request(f"two tools are named {duplicate!r}", param="functions" if setup.legacy else "tools")
    return setup


def duplicate_name(tools: list[Tool]) -> str | None:
    names = [tool.name for tool in tools]
    return next((name for name in names if names.count(name) > 1), None)


def read_tool(tool: dict[str, Any], index: int) -> Tool:
    if tool.get("type") != "function":
        raise invalid_request(f"tools[{index}].type {tool.get('type')!r} is not supported; only 'function' is",
                              param=f"tools[{index}].type")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise invalid_request(f"tools[{index}] needs a 'function' object", param=f"tools[{index}].function")
    return read_function(function, f"tools[{index}].function")


def read_function(function: dict[str, Any], param: str) -> Tool:
    name = function.get("name")
    if not isinstance(name, str) or FUNCTION_NAME.fullmatch(name) is None:
        raise invalid_request(f"{param}.name must be 1 to 64 letters, digits, underscores or dashes, got {name!r}",
                              param=f"{param}.name")
    parameters = function.get("parameters", NO_PARAMETERS)
    if not isinstance(parameters, dict):
        raise invalid_request(f"{param}.parameters must be a JSON Schema object", param=f"{param}.parameters")
    definition = {"type": "function", "function": {key: function[key] for key in ("name", "description", "parameters")
                                                   if key in function}}
    return Tool(name, parameters, definition, f"{param}.parameters")


def read_choice(choice: str | dict[str, Any] | None, tools: list[Tool], param: str) -> tuple[str, str | None]:
    """(mode, the named function or None)."""
    if choice is None:
        return ("auto" if tools else "none"), None
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise invalid_request(f"{param} 'required' needs at least one tool", param=param)
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not any(tool.name == name for tool in tools):
            raise invalid_request(f"{param} names {name!r}, which is not among the tools", param=param)
        return "named", name
    raise invalid_request(f"{param} must be 'none', 'auto', 'required' or "
                          '{"type": "function", "function": {"name": ...}}', param=param)


def tool_call_spec(setup: ToolSetup) -> StructuredOutputSpec | None:
    """The constraint on the assistant's answer under ``setup``, or None when it is free text."""
    if not setup.parses_calls:
        return None
    mode = "auto" if setup.mode == "auto" else "required"
    tools = [(tool.name, tool.parameters) for tool in setup.allowed]
    return StructuredOutputSpec("lark", tool_call_grammar(mode, setup.parallel, tools))


async def answer_constraint(
    spec: StructuredOutputSpec | None, param: str, tools: ToolSetup, validator: ConstraintValidator
) -> StructuredOutputSpec | None:
    """The grammar of the answer: the requested format (``spec``, set by ``param``) or the tool calls; validated
    (400 if it cannot be enforced) off the event loop."""
    tool_spec = tool_call_spec(tools)
    if spec is not None and tool_spec is not None:
        raise invalid_request(f"{param} cannot be combined with tool calls; set tool_choice to 'none'", param=param)
    if tool_spec is None:
        await validate_or_400(validator, spec, param)
        return spec
    for tool in tools.allowed:  # each on its own first, so that an error names the tool
        parameters = StructuredOutputSpec("json_schema", json.dumps(tool.parameters))
        await validate_or_400(validator, parameters, tool.param)
    await validate_or_400(validator, tool_spec, "tools")
    return tool_spec
