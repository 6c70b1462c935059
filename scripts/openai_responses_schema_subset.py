"""Writes tests/fixtures/openai-responses-openapi-subset.json: the Responses API schemas the tests validate against
(the response object, the stream events we send, the error body), with every schema they reference, taken from
OpenAI's published spec (github.com/openai/openai-openapi, openapi.json); descriptions and examples are left out.

    python scripts/openai_responses_schema_subset.py path/to/openapi.json COMMIT
"""
import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "openai-responses-openapi-subset.json"
ROOTS = [
    "Response", "ErrorResponse", "ResponseCreatedEvent", "ResponseInProgressEvent", "ResponseOutputItemAddedEvent",
    "ResponseContentPartAddedEvent", "ResponseTextDeltaEvent", "ResponseTextDoneEvent", "ResponseContentPartDoneEvent",
    "ResponseOutputItemDoneEvent", "ResponseFunctionCallArgumentsDeltaEvent",
    "ResponseFunctionCallArgumentsDoneEvent", "ResponseCompletedEvent", "ResponseIncompleteEvent",
    "ResponseFailedEvent", "ResponseErrorEvent",
]
DROPPED_KEYS = {"description", "example", "examples", "x-oaiMeta", "x-oaiTypeLabel", "title"}


def strip(node: Any) -> Any:
    """``node`` without prose; the names inside ``properties`` are property names, all kept."""
    if isinstance(node, list):
        return [strip(item) for item in node]
    if not isinstance(node, dict):
        return node
    stripped = {key: strip(value) for key, value in node.items() if key not in DROPPED_KEYS}
    if isinstance(node.get("properties"), dict):
        stripped["properties"] = {name: strip(value) for name, value in node["properties"].items()}
    return stripped


def references(node: Any) -> set[str]:
    if isinstance(node, list):
        return set().union(*(references(item) for item in node)) if node else set()
    if not isinstance(node, dict):
        return set()
    found = {node["$ref"].rsplit("/", 1)[-1]} if isinstance(node.get("$ref"), str) else set()
    return found.union(*(references(value) for value in node.values()))


def main(spec_path: str, commit: str) -> None:
    schemas = json.loads(Path(spec_path).read_text())["components"]["schemas"]
    kept: dict[str, Any] = {}
    pending = list(ROOTS)
    while pending:
        name = pending.pop()
        if name not in kept:
            kept[name] = strip(schemas[name])
            pending.extend(references(schemas[name]) - set(kept))
    subset = {"info": {"source": f"github.com/openai/openai-openapi@{commit} openapi.json", "roots": ROOTS},
              "components": {"schemas": dict(sorted(kept.items()))}}
    OUTPUT.write_text(json.dumps(subset, indent=1, sort_keys=False) + "\n")
    print(f"{OUTPUT}: {len(kept)} schemas")


if __name__ == "__main__":
    main(*sys.argv[1:])
