"""Request priority over HTTP: a full batch admits a high-priority request before earlier low-priority ones."""
import threading
from collections.abc import Iterator

import httpx
import pytest

from api_server import ServerProcess, wait_for

LONG_RUN_TOKENS = 300


@pytest.fixture(scope="module")
def priority_server() -> Iterator[ServerProcess]:
    server = ServerProcess("--scheduling-policy", "priority", "--max-num-seqs", "1")
    try:
        yield server
    finally:
        server.stop()


def engine_load(url: str) -> tuple[int, int]:
    health = httpx.get(f"{url}/health", timeout=5).json()
    return health["num_running"], health["num_waiting"]


def test_a_high_priority_request_starts_before_earlier_low_priority_ones(priority_server: ServerProcess):
    url = priority_server.url
    finished: list[str] = []
    lock = threading.Lock()

    def complete(name: str, priority: int, max_tokens: int) -> None:
        body = {"prompt": "In the beginning", "max_tokens": max_tokens, "ignore_eos": True, "priority": priority}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        with lock:
            finished.append(name)

    def start(name: str, priority: int, max_tokens: int = 4) -> threading.Thread:
        thread = threading.Thread(target=complete, args=(name, priority, max_tokens))
        thread.start()
        return thread

    threads = [start("running", 0, LONG_RUN_TOKENS)]
    wait_for(lambda: engine_load(url) == (1, 0), 60, "the long request to run")
    for waiting, name in enumerate(["low-1", "low-2"], start=1):  # one after the other: their arrival order is known
        threads.append(start(name, 10))
        wait_for(lambda: engine_load(url) == (1, waiting), 60, f"{name} to wait")
    threads.append(start("high", -5))
    wait_for(lambda: engine_load(url)[1] == 3, 60, "the high-priority request to wait")
    for thread in threads:
        thread.join(timeout=300)
    # One sequence at a time: each request ran whole in the order the scheduler admitted it.
    assert finished == ["running", "high", "low-1", "low-2"]


def test_a_fcfs_server_refuses_a_priority_but_takes_the_default(http: httpx.Client):
    refused = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "priority": 3,
    })
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "priority" and "--scheduling-policy priority" in error["message"]
    accepted = http.post("/v1/completions", json={"prompt": "In the", "max_tokens": 2, "priority": 0})
    assert accepted.status_code == 200, accepted.text


def test_every_generation_route_takes_a_priority(priority_server: ServerProcess):
    url = priority_server.url
    responses = httpx.post(f"{url}/v1/responses", json={"input": "Hello", "max_output_tokens": 2, "priority": -3},
                           timeout=60)
    assert responses.status_code == 200, responses.text
    messages = httpx.post(f"{url}/v1/messages", timeout=60, json={
        "model": "dots1-tiny", "max_tokens": 2, "priority": 7, "messages": [{"role": "user", "content": "Hello"}],
    })
    assert messages.status_code == 200, messages.text


def test_a_fcfs_server_refuses_a_priority_in_each_route_s_error_shape(http: httpx.Client):
    responses = http.post("/v1/responses", json={"input": "Hello", "max_output_tokens": 2, "priority": 1})
    assert responses.status_code == 400 and responses.json()["error"]["param"] == "priority"
    messages = http.post("/v1/messages", json={
        "model": "dots1-tiny", "max_tokens": 2, "priority": 1, "messages": [{"role": "user", "content": "Hello"}],
    })
    assert messages.status_code == 400
    body = messages.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "--scheduling-policy priority" in body["error"]["message"]


def test_a_priority_must_be_an_integer(http: httpx.Client):
    response = http.post("/v1/completions", json={"prompt": "In the", "max_tokens": 2, "priority": "high"})
    assert response.status_code == 400
    assert "priority" in response.json()["error"]["message"]


def test_reasoning_on_input_messages_is_accepted_and_ignored(http: httpx.Client):
    """dots.llm1 does not reason: a client's earlier reasoning (either field name) changes nothing in the prompt."""
    plain = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Peace be unto thee."},
             {"role": "user", "content": "And again?"}]
    with_reasoning = [dict(message) for message in plain]
    with_reasoning[1] |= {"reasoning_content": "The user greets me.", "reasoning": "A greeting."}
    tokens = [http.post("/tokenize", json={"messages": messages}).json()["tokens"]
              for messages in (plain, with_reasoning)]
    assert tokens[0] == tokens[1]
    response = http.post("/v1/chat/completions", json={"messages": with_reasoning, "max_tokens": 2})
    assert response.status_code == 200, response.text
