"""The constraint a request puts on its output, as plain data that travels with ``SamplingParams``."""
from dataclasses import dataclass

# json_schema: ``value`` is a JSON Schema document (JSON text); json_object: any JSON object (``value`` unused);
# regex: a regular expression the whole output matches; choice: a JSON list of strings, the output is one of them;
# lark: a Lark grammar (llguidance's dialect, which also embeds JSON schemas with ``%json``). Formats built on these
# (a model's tool calls) are the front end's business: the engine sees grammars only.
KINDS = ("json_schema", "json_object", "regex", "choice", "lark")


@dataclass(frozen=True)
class StructuredOutputSpec:
    kind: str
    value: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """What the compile cache is keyed by: two requests with equal keys share one compiled grammar."""
        return self.kind, self.value


class InvalidConstraintError(ValueError):
    """The constraint cannot be compiled (invalid, or uses a feature the backend cannot enforce)."""


def unenforceable(error: str) -> str:
    """The message of a request whose constraint failed to validate or compile."""
    return f"the constraint cannot be enforced: {error}"
