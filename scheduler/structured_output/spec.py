"""The constraint a request puts on its output, as plain data that travels with ``SamplingParams``."""
import json
from dataclasses import dataclass

# json_schema: ``value`` is a JSON Schema document (JSON text); json_object: any JSON object (``value`` unused);
# regex: a regular expression the whole output matches; choice: a JSON list of strings, the output is one of them;
# lark: a Lark grammar (llguidance's dialect, which also embeds JSON schemas with ``%json``); tool_calls: the
# assistant's answer under OpenAI tools, ``value`` a ``ToolCallConstraint`` as JSON (see ``tool_call_value``).
KINDS = ("json_schema", "json_object", "regex", "choice", "lark", "tool_calls")
CALL_OPEN = "<tool_call>"  # a call is CALL_OPEN {"name": ..., "arguments": {...}} CALL_CLOSE
CALL_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class StructuredOutputSpec:
    kind: str
    value: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """What the compile cache is keyed by: two requests with equal keys share one compiled grammar."""
        return self.kind, self.value


def tool_call_value(mode: str, parallel: bool, tools: list[tuple[str, dict]]) -> str:
    """The ``value`` of a tool_calls constraint. ``mode``: "auto" (text, or calls once the text reaches CALL_OPEN)
    or "required" (calls only); ``parallel``: any number of calls, else one; ``tools``: (name, parameters schema)."""
    return json.dumps({"mode": mode, "parallel": parallel,
                       "tools": [{"name": name, "parameters": parameters} for name, parameters in tools]})


class InvalidConstraintError(ValueError):
    """The constraint cannot be compiled (invalid, or uses a feature the backend cannot enforce)."""
