"""A client that goes away aborts its engine request, whose KV blocks are then free again."""
import json
import socket

import httpx
from api_server import ServerProcess, wait_for
from conftest import MODEL

LONG_GENERATION = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
                   "max_tokens": 1900, "ignore_eos": True}


def engine_load(http: httpx.Client) -> dict:
    return http.get("/health").json()


def kv_usage_metric(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("dots_serve_kv_cache_usage_ratio{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("dots_serve_kv_cache_usage_ratio is not exported")


def is_idle(http: httpx.Client) -> bool:
    load = engine_load(http)
    return load["num_running"] == 0 and load["num_waiting"] == 0 and load["kv_cache_usage"] == 0.0


def test_stream_closed_mid_way_frees_its_blocks(http: httpx.Client, server: ServerProcess) -> None:
    wait_for(lambda: is_idle(http), 30, "an idle engine before the test")
    with http.stream("POST", "/v1/chat/completions", json={**LONG_GENERATION, "stream": True}) as response:
        assert response.status_code == 200
        # Keep the line iterator referenced: an abandoned httpx iterator closes the connection when collected.
        lines = response.iter_lines()
        completion_id = None
        content_chunks = 0
        while content_chunks < 3:
            line = next(lines)
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                completion_id = chunk["id"]
                content_chunks += bool(chunk["choices"][0]["delta"].get("content"))
        load = engine_load(http)
        assert load["num_running"] == 1 and load["kv_cache_usage"] > 0.0
        assert kv_usage_metric(http) > 0.0
    # Leaving the block closes the connection with most of the 1900 tokens still to generate.
    wait_for(lambda: is_idle(http), 30, "the aborted request to free its blocks")
    assert kv_usage_metric(http) == 0.0
    wait_for(lambda: f"{completion_id} " in server.log_text(), 10, "the request's log line")
    [line] = [line for line in server.log_text().splitlines() if f"{completion_id} " in line]
    assert "outcome=disconnected" in line


def test_non_streaming_client_gone_frees_its_blocks(http: httpx.Client, server: ServerProcess) -> None:
    wait_for(lambda: is_idle(http), 30, "an idle engine before the test")
    body = json.dumps(LONG_GENERATION).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-Id: gone-away-1\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(request)
        wait_for(lambda: engine_load(http)["kv_cache_usage"] > 0.0, 30, "the request to start generating")
    wait_for(lambda: is_idle(http), 30, "the abandoned request to free its blocks")
    wait_for(lambda: "request_id=gone-away-1 " in server.log_text(), 10, "the request's log line")
    [line] = [line for line in server.log_text().splitlines() if "request_id=gone-away-1 " in line]
    assert "outcome=disconnected" in line
