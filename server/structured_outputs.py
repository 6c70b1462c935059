"""``response_format`` (OpenAI) and ``structured_outputs`` (vLLM's extension) as an engine constraint.

The constraint is validated here, in a worker thread, so that an invalid schema (or one using a feature the grammar
backend cannot enforce) is answered with a 400 naming it before the request is queued; only the engine core compiles
it (once per key, off its step).
"""
import asyncio
import json
from typing import Any

from scheduler.structured_output.spec import InvalidConstraintError, StructuredOutputSpec
from scheduler.structured_output.validator import ConstraintValidator
from server.errors import invalid_request

STRUCTURED_OUTPUT_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def response_format_spec(response_format: dict[str, Any] | None) -> StructuredOutputSpec | None:
    """OpenAI's ``{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}``."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputSpec("json_object")
    if kind != "json_schema":
        raise invalid_request(
            f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'",
            param="response_format.type",
        )
    json_schema = response_format.get("json_schema")
    if not isinstance(json_schema, dict):
        raise invalid_request("response_format json_schema needs a 'json_schema' object",
                              param="response_format.json_schema")
    name = json_schema.get("name")
    if not isinstance(name, str) or not name:
        raise invalid_request("response_format json_schema needs a 'name'", param="response_format.json_schema.name")
    schema = json_schema.get("schema", {})
    if not isinstance(schema, (dict, bool)):
        raise invalid_request("response_format json_schema.schema must be a JSON Schema object",
                              param="response_format.json_schema.schema")
    return StructuredOutputSpec("json_schema", json.dumps(schema))


def extension_spec(structured_outputs: dict[str, Any] | None) -> StructuredOutputSpec | None:
    """vLLM's ``{"json": schema} | {"regex": str} | {"choice": [str]} | {"grammar": lark} | {"json_object": true}``."""
    if structured_outputs is None:
        return None
    given = [key for key in STRUCTURED_OUTPUT_KEYS if structured_outputs.get(key) not in (None, False)]
    unknown = sorted(set(structured_outputs) - set(STRUCTURED_OUTPUT_KEYS))
    if unknown:
        raise invalid_request(f"structured_outputs: unsupported keys {unknown}; supported: "
                              f"{list(STRUCTURED_OUTPUT_KEYS)}", param="structured_outputs")
    if len(given) != 1:
        raise invalid_request(f"structured_outputs needs exactly one of {list(STRUCTURED_OUTPUT_KEYS)}",
                              param="structured_outputs")
    key = given[0]
    value = structured_outputs[key]
    param = f"structured_outputs.{key}"
    if key == "json":
        if isinstance(value, str):
            return StructuredOutputSpec("json_schema", value)
        if not isinstance(value, (dict, bool)):
            raise invalid_request("structured_outputs.json must be a JSON Schema", param=param)
        return StructuredOutputSpec("json_schema", json.dumps(value))
    if key == "json_object":
        return StructuredOutputSpec("json_object")
    if key == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise invalid_request("structured_outputs.choice must be a non-empty list of strings", param=param)
        return StructuredOutputSpec("choice", json.dumps(value))
    if not isinstance(value, str) or not value:
        raise invalid_request(f"{param} must be a non-empty string", param=param)
    return StructuredOutputSpec("regex" if key == "regex" else "lark", value)


def request_spec(
    response_format: dict[str, Any] | None, structured_outputs: dict[str, Any] | None
) -> tuple[StructuredOutputSpec | None, str]:
    """The request's constraint and the parameter that set it."""
    from_format = response_format_spec(response_format)
    from_extension = extension_spec(structured_outputs)
    if from_format is not None and from_extension is not None:
        raise invalid_request("give either response_format or structured_outputs, not both", param="structured_outputs")
    if from_extension is not None:
        return from_extension, "structured_outputs"
    return from_format, "response_format"


async def validate_or_400(validator: ConstraintValidator, spec: StructuredOutputSpec | None, param: str) -> None:
    """Validates ``spec`` off the event loop (a known one returns at once); a 400 naming ``param`` if it cannot be
    enforced."""
    if spec is None:
        return
    try:
        await asyncio.to_thread(validator.validate, spec)
    except InvalidConstraintError as error:
        raise invalid_request(f"{param} cannot be enforced: {error}", param=param, code="invalid_constraint") from None
