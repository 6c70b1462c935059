"""The chat page at ``/``: plain HTML, CSS and JavaScript from server/static/, read once at start-up."""
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from server.config import ServerConfig
from server.errors import APIError

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE = "index.html"
ASSETS = {"chat.css": "text/css; charset=utf-8", "chat.js": "text/javascript; charset=utf-8"}
# The page talks only to this server; nothing from elsewhere runs, loads or receives data.
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


def page_url(config: ServerConfig) -> str:
    """Where a browser on this machine finds the page (a wildcard address is not one to browse to)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(config.host, config.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{config.port}/"


def add_chat_page(app: FastAPI) -> None:
    """GET / and GET /static/{name}; anything else under /static/ is a 404 in OpenAI's error shape."""
    page = (STATIC_DIR / PAGE).read_bytes()
    assets = {name: (STATIC_DIR / name).read_bytes() for name in ASSETS}

    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def chat_asset(name: str) -> Response:
        if name not in assets:
            raise APIError(404, f"Unknown route GET /static/{name}", code="not_found")
        return Response(assets[name], media_type=ASSETS[name], headers=HEADERS)
