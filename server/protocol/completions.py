"""POST /v1/completions request body."""
from typing import Any

from server.protocol.common import SamplingRequest

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    max_tokens: int | None = 16  # OpenAI's default for this endpoint
    logprobs: int | None = None
    echo: bool = False
    response_format: dict[str, Any] | None = None
    # Accepted so that we can refuse them clearly rather than silently ignore them.
    suffix: str | None = None
    best_of: int | None = None
    # Extensions.
    structured_outputs: dict[str, Any] | None = None  # vLLM's: json, regex, choice, grammar (Lark), json_object

