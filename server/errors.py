"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, for every failure path; on the
Anthropic routes in Anthropic's shape (``server/anthropic/errors.py``)."""
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler.outputs import EngineDeadError, RequestRejected
from scheduler.sampling_params import InvalidParameterError
from server.anthropic import errors as anthropic_errors

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}
TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    """An error answered to the client; everything the server refuses goes through here."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, path: str = "", request_id: str | None = None) -> JSONResponse:
        """The error as the route at ``path`` answers errors."""
        if anthropic_errors.is_anthropic_route(path):
            return anthropic_errors.error_response(self.status, self.message, self.headers, request_id)
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def param_from_location(location: tuple[int | str, ...]) -> str | None:
    """``("messages", 0, "role")`` -> ``"messages[0].role"``; stops at pydantic's union member tags."""
    param = ""
    for part in location:
        if isinstance(part, int):
            param += f"[{part}]"
        elif "[" in part or part in TYPE_TAGS or part.startswith("function-"):
            break
        else:
            param += f".{part}" if param else part
    return param or None


def from_validation_error(error: ValidationError | RequestValidationError) -> APIError:
    details = error.errors()
    first = details[0]
    if first["type"] == "json_invalid":
        return invalid_request(f"The request body is not valid JSON: {first['msg']}", code="invalid_json")
    location = tuple(part for part in first["loc"] if part != "body")
    param = param_from_location(location)
    message = first["msg"].removeprefix("Value error, ")
    if param is not None:
        message = f"{param}: {message}"
    if first["type"] == "model_type" and not location:
        message = "The request body must be a JSON object"
    return invalid_request(message, param=param)


def from_engine_error(error: RequestRejected | InvalidParameterError | EngineDeadError) -> APIError:
    """The engine's refusals as API errors."""
    if isinstance(error, RequestRejected):
        return invalid_request(error.message, param=error.param, code=error.code)
    if isinstance(error, InvalidParameterError):
        return invalid_request(str(error), param=error.param)
    return APIError(503, f"The engine has stopped: {error}", code="engine_dead")


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def handle_api_error(request: Request, error: APIError) -> JSONResponse:
    return error.response(request.url.path, request_id_of(request))


async def handle_request_validation(request: Request, error: RequestValidationError) -> JSONResponse:
    return from_validation_error(error).response(request.url.path, request_id_of(request))


async def handle_http_exception(request: Request, error: StarletteHTTPException) -> JSONResponse:
    if error.status_code == 404:
        message = f"Unknown route {request.method} {request.url.path}"
    else:
        message = str(error.detail)
    code = "not_found" if error.status_code == 404 else None
    api_error = APIError(error.status_code, message, code=code, headers=dict(error.headers or {}))
    return api_error.response(request.url.path, request_id_of(request))


async def handle_unexpected(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    api_error = APIError(500, "Internal server error; the request was not completed.")
    return api_error.response(request.url.path, request_id_of(request))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(RequestValidationError, handle_request_validation)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(Exception, handle_unexpected)
