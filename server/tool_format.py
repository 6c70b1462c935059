"""The model's tool-call format, as the shipped chat template writes calls and the engine's grammar enforces them.

A call is ``<tool_call>{"name":NAME,"arguments":{...}}</tool_call>``. ``tool_call_grammar`` turns the callable tools
into a Lark grammar (llguidance's dialect, JSON schemas embedded with ``%json``): the engine sees only that grammar,
so another model's format is a change to this file, its template and ``tool_parser.py``.
"""
import json
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
# Compact JSON inside calls: no whitespace between tokens, so max_tokens goes to content.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def tool_call_grammar(mode: str, parallel: bool, tools: list[tuple[str, dict[str, Any]]]) -> str:
    """Lark for the assistant's answer. ``mode``: "auto" (text that never contains the tag, or text lazily up to the
    first tag and then only calls) or "required" (calls only); ``parallel``: any number of calls, else one;
    ``tools``: (name, parameters schema) of each callable tool; each call's JSON matches one of them."""
    alternatives = [
        {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
         "required": ["name", "arguments"], "additionalProperties": False}
        for name, parameters in tools
    ]
    call_schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    close = json.dumps(CALL_CLOSE)
    more_calls = f" ({json.dumps(CALL_OPEN)} call_body {close})*" if parallel else ""
    if mode == "auto":
        start = (
            f"start: TEXT | text_then_tag call_body {close}{more_calls}\n"
            f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{CALL_OPEN}(.|\\n)*/\n"
            f"text_then_tag[lazy]: /(.|\\n)*/ {json.dumps(CALL_OPEN)}\n"
        )
    else:
        start = f"start: {json.dumps(CALL_OPEN)} call_body {close}{more_calls}\n"
    return "%llguidance {}\n" + start + "call_body: %json " + json.dumps({**call_schema, "x-guidance": COMPACT_JSON})
