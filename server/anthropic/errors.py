"""Errors on the Anthropic routes in Anthropic's shape: ``{"type": "error", "error": {"type", "message"},
"request_id"}``, with Anthropic's error type for each status (docs.claude.com/en/api/errors)."""
from typing import Any

from fastapi.responses import JSONResponse

ROUTE_PREFIX = "/v1/messages"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def is_anthropic_route(path: str) -> bool:
    return path == ROUTE_PREFIX or path.startswith(ROUTE_PREFIX + "/")


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(status: int, message: str, request_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type(status), "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def error_response(status: int, message: str, headers: dict[str, str], request_id: str | None) -> JSONResponse:
    if request_id is not None:
        headers = {**headers, "request-id": request_id}
    return JSONResponse(error_body(status, message, request_id), status_code=status, headers=headers)
