"""Servers with their own flags: API keys, the concurrency cap (429), graceful drain on SIGTERM/SIGINT."""
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest
from api_server import REPO, ServerProcess, free_port, wait_for
from conftest import MODEL
from openai_schema import validate
from sse_events import DONE, parse_events

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


CUSTOM_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                   "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def guarded_server() -> Iterator[ServerProcess]:
    """API keys from two flags (one comma-separated) and the environment; one request at a time; a literal
    chat template overriding the checkpoint's."""
    with ServerProcess("--api-key", "key-one", "--api-key", "key-two,key-three", "--max-concurrent-requests", "1",
                       "--chat-template", CUSTOM_TEMPLATE, env={"DOTS_SERVE_API_KEY": "key-env"}) as process:
        yield process


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_api_key_protects_the_api_but_not_probes(guarded_server: ServerProcess) -> None:
    with httpx.Client(base_url=guarded_server.url, timeout=30) as http:
        for headers in ({}, bearer("wrong"), {"Authorization": "key-one"}, {"Authorization": "Basic key-one"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
                                 ("POST", "/detokenize"), ("GET", "/v1/no-such-route")):
                response = http.request(method, path, headers=headers, json={})
                assert response.status_code == 401, (headers, path)
                validate(response.json(), "ErrorResponse")
                assert response.json()["error"]["code"] == "invalid_api_key"
        for key in ("key-one", "key-two", "key-three", "key-env"):
            assert http.get("/v1/models", headers=bearer(key)).status_code == 200
        for path in ("/health", "/ready", "/metrics"):
            assert http.get(path).status_code == 200
    client = openai.OpenAI(base_url=f"{guarded_server.url}/v1", api_key="key-three", max_retries=0)
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded_server.url}/v1", api_key="nope", max_retries=0).models.list()


def test_over_the_concurrency_cap_gets_429(guarded_server: ServerProcess) -> None:
    with httpx.Client(base_url=guarded_server.url, timeout=60, headers=bearer("key-one")) as http:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1900, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            next(lines)  # admitted and streaming
            refused = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            validate(refused.json(), "ErrorResponse")
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert http.get("/v1/models").status_code == 200  # only generation is capped
        wait_for(lambda: http.get("/health").json()["in_flight_requests"] == 0, 30, "the stream to be released")
        after = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
        assert after.status_code == 200


def test_chat_template_flag_overrides_the_checkpoint_template(guarded_server: ServerProcess) -> None:
    with httpx.Client(base_url=guarded_server.url, timeout=30, headers=bearer("key-one")) as http:
        tokens = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()["tokens"]
        assert http.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == "[user]Hi[assistant]"


class StreamInBackground:
    """A streaming chat request read to its end on a thread; ``events`` fills as chunks arrive."""

    def __init__(self, url: str, **body: object) -> None:
        self.events: list = []
        self.started = threading.Event()
        self.error: BaseException | None = None
        payload = {"model": MODEL, "messages": MESSAGES, "stream": True, "ignore_eos": True, **body}
        self.thread = threading.Thread(target=self.run, args=(url, payload), daemon=True)
        self.thread.start()

    def run(self, url: str, payload: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=payload, timeout=120) as response:
                for event in parse_events(response.iter_lines()):
                    self.events.append(event)
                    if event != DONE and any(c["delta"].get("content") for c in event["choices"]):
                        self.started.set()
        except BaseException as error:
            self.error = error
        finally:
            self.started.set()

    def result(self) -> list:
        self.thread.join(timeout=120)
        assert not self.thread.is_alive() and self.error is None, self.error
        return self.events


def finish_reasons(events: list) -> list[str]:
    return [c["finish_reason"] for e in events if e != DONE for c in e["choices"] if c["finish_reason"]]


def test_sigterm_drains_in_flight_requests_then_exits_zero() -> None:
    # 300 tokens keep the drain open long enough to probe it, and finish well within the timeout even on a
    # busy machine.
    with ServerProcess("--shutdown-timeout", "120") as server:
        in_flight = StreamInBackground(server.url, max_tokens=300, stream_options={"include_usage": True})
        assert in_flight.started.wait(60)
        server.signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{server.url}/ready").status_code == 503, 30, "/ready to report draining")
        assert httpx.get(f"{server.url}/ready").headers["retry-after"]
        refused = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
        assert refused.status_code == 503
        assert refused.headers["retry-after"]
        validate(refused.json(), "ErrorResponse")
        assert refused.json()["error"]["code"] == "server_draining"
        events = in_flight.result()
        assert events[-1] == DONE
        assert finish_reasons(events) == ["length"]
        assert events[-2]["usage"]["completion_tokens"] == 300
        assert server.wait(60) == 0
        assert "SIGTERM received: draining" in server.log_text()


def test_sigint_past_the_shutdown_timeout_aborts_and_exits_zero() -> None:
    with ServerProcess("--shutdown-timeout", "0.5") as server:
        streaming = StreamInBackground(server.url, max_tokens=1900)
        assert streaming.started.wait(60)
        collected: dict = {}
        blocking = threading.Thread(target=lambda: collected.update(httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 1900, "ignore_eos": True}, timeout=120).json()))
        blocking.start()
        wait_for(lambda: httpx.get(f"{server.url}/health").json()["num_running"] == 2, 30, "both requests to run")
        server.signal(signal.SIGINT)
        events = streaming.result()
        blocking.join(timeout=120)
        assert events[-1] == DONE
        assert finish_reasons(events) == ["abort"]
        assert collected["choices"][0]["finish_reason"] == "abort"
        assert 0 < collected["usage"]["completion_tokens"] < 1900
        assert server.wait(60) == 0


def test_a_model_that_cannot_load_makes_the_server_exit_nonzero(tmp_path) -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "server", "--model", str(tmp_path / "missing"), "--port", str(port)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "loading the model failed" in result.stderr


def test_help_explains_every_flag() -> None:
    result = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    for flag in ("--model", "--served-model-name", "--host", "--port", "--api-key", "--dtype", "--device",
                 "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--kv-cache-memory", "--block-size",
                 "--max-concurrent-requests", "--shutdown-timeout", "--chat-template", "--load-format", "--log-level",
                 "--config", "--tensor-parallel-size", "--enable-expert-parallel", "--no-expert-metrics",
                 "--log-prompts", "--enforce-eager"):
        assert flag in result.stdout, flag
