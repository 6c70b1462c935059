"""The engine core in its own process: a killed engine, a dead input or output thread in it, or a device that fails
for good fails every stream with an error event and takes the server down (non-zero, no process left behind); a drain
past its deadline aborts running and queued requests alike."""
import os
import re
import signal
import threading

import httpx
from api_server import ServerProcess, wait_for
from conftest import MODEL
from openai_schema import validate
from process_table import descendants, is_running
from sse_events import DONE, parse_events

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
ENGINE_PID_LINE = re.compile(r"engine core: process pid (\d+)")
STREAM_END_DEADLINE_S = 15.0


class Stream:
    """One streaming chat request read on a thread; ``started`` once a content chunk arrived."""

    def __init__(self, url: str, **body: object) -> None:
        self.events: list = []
        self.started = threading.Event()
        self.ended = threading.Event()
        payload = {"model": MODEL, "messages": MESSAGES, "stream": True, "ignore_eos": True, **body}
        threading.Thread(target=self.run, args=(url, payload), daemon=True).start()

    def run(self, url: str, payload: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=payload, timeout=120) as response:
                for event in parse_events(response.iter_lines()):
                    self.events.append(event)
                    if event != DONE and "choices" in event and any(c["delta"].get("content") for c in event["choices"]):
                        self.started.set()
        finally:
            self.started.set()
            self.ended.set()

    def finish_reasons(self) -> list[str]:
        return [c["finish_reason"] for e in self.events if e != DONE and "choices" in e for c in e["choices"]
                if c["finish_reason"]]


def test_a_killed_engine_ends_every_stream_with_an_error_and_the_server_exits_nonzero() -> None:
    with ServerProcess() as server:
        [engine_pid] = [int(pid) for pid in ENGINE_PID_LINE.findall(server.log_text())]
        children = descendants(server.process.pid)
        assert engine_pid in children
        streams = [Stream(server.url, max_tokens=1900) for _ in range(8)]
        for stream in streams:
            assert stream.started.wait(60)
        assert all(not stream.ended.is_set() for stream in streams)

        os.kill(engine_pid, signal.SIGKILL)
        for stream in streams:
            assert stream.ended.wait(STREAM_END_DEADLINE_S), "a stream did not end after the engine died"
            assert stream.events[-1] == DONE
            error = stream.events[-2]
            validate(error, "ErrorResponse")
            assert error["error"]["code"] == "engine_dead" and "SIGKILL" in error["error"]["message"]
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
        refused = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2},
                             timeout=5)
        assert refused.status_code == 503
        validate(refused.json(), "ErrorResponse")
        assert server.wait(60) != 0
        wait_for(lambda: not any(is_running(pid) for pid in children), 30, "every child process to exit")


def assert_engine_died(server: ServerProcess, streams: list[Stream], message: str) -> None:
    """Every stream ended with an engine_dead error event naming ``message``; /health says dead; the server exits
    non-zero and leaves no process behind."""
    children = descendants(server.process.pid)
    for stream in streams:
        assert stream.ended.wait(STREAM_END_DEADLINE_S), "a stream did not end after the engine died"
        assert stream.events[-1] == DONE
        error = stream.events[-2]
        validate(error, "ErrorResponse")
        assert error["error"]["code"] == "engine_dead" and message in error["error"]["message"], error
        assert "stop" not in stream.finish_reasons()
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
    assert server.wait(60) != 0
    wait_for(lambda: not any(is_running(pid) for pid in children), 30, "every child process to exit")


def test_a_failed_input_thread_in_the_engine_kills_the_engine() -> None:
    # Message 1 is the first request; receiving the second one raises.
    with ServerProcess(env={"DOTS_SERVE_FAULT_INPUT_THREAD_AT": "2"}) as server:
        first = Stream(server.url, max_tokens=1900)
        assert first.started.wait(60)
        second = Stream(server.url, max_tokens=1900)
        assert_engine_died(server, [first, second], "the engine-input thread failed")


def test_a_failed_output_thread_in_the_engine_kills_the_engine() -> None:
    with ServerProcess(env={"DOTS_SERVE_FAULT_OUTPUT_THREAD_AT": "30"}) as server:
        streams = [Stream(server.url, max_tokens=1900) for _ in range(2)]
        assert_engine_died(server, streams, "the engine-output thread failed")


def test_a_device_that_fails_for_good_kills_the_engine() -> None:
    # Late enough that both streams have started, however slowly this machine sends the second request.
    env = {"DOTS_SERVE_FAULT_STEP_AT": "60", "DOTS_SERVE_FAULT_DEVICE_BROKEN": "1"}
    with ServerProcess(env=env) as server:
        streams = []
        for _ in range(2):
            streams.append(Stream(server.url, max_tokens=1900))
            assert streams[-1].started.wait(60)
        assert_engine_died(server, streams, "fails after a failed step")


def test_drain_past_the_deadline_aborts_running_and_queued_requests() -> None:
    # One sequence at a time: the second and third requests wait in the engine's queue when the drain ends.
    with ServerProcess("--max-num-seqs", "1", "--shutdown-timeout", "1") as server:
        running = Stream(server.url, max_tokens=1900)
        assert running.started.wait(60)
        queued = [Stream(server.url, max_tokens=1900) for _ in range(2)]
        wait_for(lambda: httpx.get(f"{server.url}/health").json()["num_waiting"] == 2, 30, "two queued requests")
        server.signal(signal.SIGTERM)
        for stream in [running, *queued]:
            assert stream.ended.wait(60)
            assert stream.events[-1] == DONE
            assert stream.finish_reasons() == ["abort"]
        assert server.wait(60) == 0
