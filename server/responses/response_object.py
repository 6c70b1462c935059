"""The response object: the output, its status and usage, and the request's settings echoed back."""
import time
from typing import Any

from server.responses.protocol import ResponsesRequest
from server.responses.tools import echoed_tools

FAILURE_CODES = ("server_error", "rate_limit_exceeded", "context_length_exceeded", "invalid_prompt")


def response_usage(input_tokens: int, output_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        # cache_write_tokens is OpenAI's explicitly cached prompt; the prefix cache here is implicit.
        "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def response_error(code: str | None, message: str) -> dict[str, str]:
    return {"code": code if code in FAILURE_CODES else "server_error", "message": message}


def response_object(
    request: ResponsesRequest, response_id: str, model: str, created_at: int, stored: bool, status: str,
    output: list[dict[str, Any]], usage: dict[str, Any] | None = None, error: dict[str, str] | None = None,
) -> dict[str, Any]:
    response = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "completed_at": int(time.time()) if status == "completed" else None,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": request.parallel_tool_calls,
        "previous_response_id": request.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "store": stored,
        "temperature": request.temperature,
        "text": {"format": (request.text or {}).get("format") or {"type": "text"}},
        "tool_choice": request.tool_choice or ("auto" if request.tools else "none"),
        "tools": echoed_tools(request),
        "top_p": request.top_p,
        "truncation": request.truncation or "disabled",
        "metadata": request.metadata or {},
    }
    # Not nullable in OpenAI's schema: present or absent.
    if usage is not None:
        response["usage"] = usage
    if request.user is not None:
        response["user"] = request.user
    return response
