"""Validates our responses against OpenAI's published OpenAPI schemas: chat and completions from the subset in
../shared/reference, the Responses API from tests/fixtures/openai-responses-openapi-subset.json (written by
scripts/openai_responses_schema_subset.py)."""
import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SPEC_CANDIDATES = [
    Path(__file__).resolve().parents[3] / "shared" / "reference" / "openai-openapi-subset.json",
    Path("/work/shared/reference/openai-openapi-subset.json"),
]

RESPONSES_SPEC = Path(__file__).resolve().parents[1] / "fixtures" / "openai-responses-openapi-subset.json"


def spec_path() -> Path:
    for path in SPEC_CANDIDATES:
        if path.is_file():
            return path
    raise FileNotFoundError(f"OpenAI schema subset not found in {SPEC_CANDIDATES}")


def allow_nulls(node: Any) -> Any:
    """OpenAPI's ``nullable: true`` means "or null"; plain JSON Schema needs that spelled out."""
    if isinstance(node, list):
        return [allow_nulls(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: allow_nulls(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


def allow_null_first_echo_logprob(schemas: dict[str, Any]) -> None:
    """OpenAI's API answers ``echo`` with logprobs with null for the first prompt token (it has no context);
    the published schema does not say so, so this one place is widened to match the real API."""
    choice = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"]
    logprobs = choice["properties"]["logprobs"]["anyOf"][0]["properties"]
    for key in ("token_logprobs", "top_logprobs"):
        logprobs[key]["items"] = {"anyOf": [logprobs[key]["items"], {"type": "null"}]}


def add_completion_stream_schema(schemas: dict[str, Any]) -> None:
    """The spec says streamed completion chunks share ``CreateCompletionResponse``'s shape, but a chunk before the
    end has no finish reason yet and OpenAI sends null there. ``CreateCompletionStreamResponse`` (our name, not the
    spec's) is that shape with a nullable ``finish_reason``; everything else stays as published."""
    stream_schema = copy.deepcopy(schemas["CreateCompletionResponse"])
    choice = stream_schema["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    schemas["CreateCompletionStreamResponse"] = stream_schema


@lru_cache(maxsize=None)
def validator(schema_name: str) -> Draft202012Validator:
    spec = allow_nulls(json.loads(spec_path().read_text()))
    schemas = copy.deepcopy(spec["components"]["schemas"])
    allow_null_first_echo_logprob(schemas)
    add_completion_stream_schema(schemas)
    return schema_validator(schemas, schema_name)


@lru_cache(maxsize=None)
def responses_validator(schema_name: str) -> Draft202012Validator:
    schemas = allow_nulls(json.loads(RESPONSES_SPEC.read_text()))["components"]["schemas"]
    return schema_validator(schemas, schema_name)


def schema_validator(schemas: dict[str, Any], schema_name: str) -> Draft202012Validator:
    if schema_name not in schemas:
        raise KeyError(f"{schema_name} is not in the schema subset")
    return Draft202012Validator({"components": {"schemas": schemas}, "$ref": f"#/components/schemas/{schema_name}"})


def validate(instance: Any, schema_name: str) -> None:
    """Raises jsonschema.ValidationError when ``instance`` does not match the named schema."""
    validator(schema_name).validate(instance)


def validate_responses(instance: Any, schema_name: str) -> None:
    """Like ``validate``, against the Responses API schemas."""
    responses_validator(schema_name).validate(instance)
