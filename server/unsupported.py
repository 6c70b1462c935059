"""OpenAI features this server does not offer yet: refused with a clear 400 instead of being ignored."""
from typing import Any

from server.errors import invalid_request
from server.protocol.chat import ChatCompletionRequest
from server.protocol.completions import CompletionRequest


def reject_response_format(response_format: dict[str, Any] | None) -> None:
    if response_format is not None and response_format.get("type") != "text":
        raise invalid_request(
            f"response_format type {response_format.get('type')!r} is not supported; only 'text' is",
            param="response_format",
        )


def reject_unsupported_chat(request: ChatCompletionRequest) -> None:
    if request.tools:
        raise invalid_request("tools are not supported by this model server", param="tools")
    if request.functions:
        raise invalid_request("functions are not supported by this model server", param="functions")
    for name in ("tool_choice", "function_call"):
        choice = getattr(request, name)
        if choice not in (None, "none", "auto"):
            raise invalid_request(f"{name} {choice!r} is not supported; no tools are available", param=name)
    reject_response_format(request.response_format)


def reject_unsupported_completion(request: CompletionRequest) -> None:
    if request.suffix:
        raise invalid_request("suffix is not supported by this model server", param="suffix")
    if request.best_of is not None and request.best_of not in (1, request.n):
        raise invalid_request("best_of other than 1 or n is not supported", param="best_of")
    reject_response_format(request.response_format)
