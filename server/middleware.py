"""Pure ASGI middleware (streaming-safe): request ids and HTTP metrics, API keys, request body size."""
import hmac
import re
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError
from server.metrics import ServerMetrics

CLIENT_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces, bounded


def route_template(scope: Scope) -> str:
    """``/v1/models/{model_id}`` rather than the raw path, so that metric labels stay few."""
    route = scope.get("route")
    return getattr(route, "path", "unmatched")


class RequestContextMiddleware:
    """Gives every response an ``X-Request-Id`` (the client's when valid) and counts it in the metrics."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client_id = Headers(scope=scope).get("x-request-id")
        request_id = client_id if client_id and CLIENT_REQUEST_ID.match(client_id) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-Id", request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            self.metrics.observe_http(route_template(scope), scope["method"], status)


def is_protected(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


def request_id_of(scope: Scope) -> str | None:
    return scope.get("state", {}).get("request_id")


class APIKeyMiddleware:
    """``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (Anthropic's clients) on the API routes; probes and
    /metrics stay open."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]

    def presented_keys(self, headers: Headers) -> list[bytes]:
        keys = []
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            keys.append(token.strip().encode())
        if "x-api-key" in headers:
            keys.append(headers["x-api-key"].strip().encode())
        return keys

    def authorized(self, presented_keys: list[bytes]) -> bool:
        # Compare against every key so that the time taken does not tell which key is close.
        matches = [hmac.compare_digest(presented, key) for presented in presented_keys for key in self.api_keys]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_protected(scope["path"]):
            if not self.authorized(self.presented_keys(Headers(scope=scope))):
                error = APIError(
                    401,
                    "Missing or invalid API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error.response(scope["path"], request_id_of(scope))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the limit of {limit} bytes.", code="request_too_large")


class BodyLimitMiddleware:
    """413 for a declared ``Content-Length`` over the limit, or once a chunked body grows past it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await body_too_large(self.max_bytes).response(scope["path"], request_id_of(scope))(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise body_too_large(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)
