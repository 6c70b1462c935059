"""Stop signals sent to the server's whole process group, as systemd (KillMode=control-group), supervisord
(stopasgroup), docker and Ctrl-C send them: in-flight requests still finish, the server exits 0, and no process or
resource-tracker complaint is left behind; during model loading the server stops within seconds, non-zero."""
import re
import signal
import time

import httpx
import pytest
from api_server import ServerProcess, wait_for
from process_table import descendants, ignored_signals, is_running
from sse_events import DONE
from test_api_operations import StreamInBackground

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
MAX_TOKENS = 200
LOADING_EXIT_DEADLINE_S = 10.0
ENGINE_PID_LINE = re.compile(r"engine core: process pid (\d+)")


def start_stream(url: str, max_tokens: int = MAX_TOKENS) -> StreamInBackground:
    """A streaming chat request read to its end on a thread."""
    return StreamInBackground(url, messages=MESSAGES, max_tokens=max_tokens, stream_options={"include_usage": True})


def assert_nothing_left(server: ServerProcess, tree: set[int]) -> None:
    wait_for(lambda: not any(is_running(pid) for pid in tree), 30, "every process of the tree to exit")
    log = server.log_text()
    assert "resource_tracker" not in log and "leaked" not in log, log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_the_process_group_drains_in_flight_streams(signum: int) -> None:
    with ServerProcess("--shutdown-timeout", "120", own_process_group=True) as server:
        tree = descendants(server.process.pid)
        assert len(tree) >= 2  # the engine process and multiprocessing's resource tracker
        engine_pid = int(ENGINE_PID_LINE.search(server.log_text()).group(1))
        assert {signal.SIGTERM, signal.SIGINT} <= ignored_signals(engine_pid)
        streams = [start_stream(server.url) for _ in range(2)]
        for stream in streams:
            assert stream.started.wait(60)
        server.signal_group(signum)
        wait_for(lambda: httpx.get(f"{server.url}/ready").status_code == 503, 30, "/ready to report draining")
        refused = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_draining"
        for stream in streams:
            events = stream.result()
            assert events[-1] == DONE
            assert events[-2]["usage"]["completion_tokens"] == MAX_TOKENS
            assert [c["finish_reason"] for e in events[:-2] for c in e["choices"] if c["finish_reason"]] == ["length"]
        assert server.wait(60) == 0
        assert f"{signal.Signals(signum).name} received: draining" in server.log_text()
        assert_nothing_left(server, tree)


def test_a_second_signal_to_the_process_group_aborts_in_flight_streams_at_once() -> None:
    with ServerProcess("--shutdown-timeout", "300", own_process_group=True) as server:
        tree = descendants(server.process.pid)
        in_flight = start_stream(server.url, max_tokens=1900)
        assert in_flight.started.wait(60)
        server.signal_group(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{server.url}/ready").status_code == 503, 30, "/ready to report draining")
        server.signal_group(signal.SIGTERM)
        events = in_flight.result()
        assert events[-1] == DONE
        assert [c["finish_reason"] for e in events[:-2] for c in e["choices"] if c["finish_reason"]] == ["abort"]
        assert events[-2]["usage"]["completion_tokens"] < 1900
        assert server.wait(30) == 0
        assert "SIGTERM received again: aborting in-flight requests now" in server.log_text()
        assert_nothing_left(server, tree)


def test_a_stop_signal_during_model_loading_stops_everything_within_seconds() -> None:
    with ServerProcess(env={"DOTS_SERVE_FAULT_LOAD_DELAY_S": "600"}, own_process_group=True,
                       until_ready=False) as server:
        wait_for(lambda: ENGINE_PID_LINE.search(server.log_text()) is not None, 60, "the engine process to start")
        assert httpx.get(f"{server.url}/health").json()["status"] == "loading"
        tree = descendants(server.process.pid)
        engine_pid = int(ENGINE_PID_LINE.search(server.log_text()).group(1))
        assert engine_pid in tree
        started = time.monotonic()
        server.signal_group(signal.SIGTERM)
        assert server.wait(LOADING_EXIT_DEADLINE_S) != 0
        assert time.monotonic() - started < LOADING_EXIT_DEADLINE_S
        assert "killed by SIGTERM" not in server.log_text()  # the engine ignored it; the server stopped it
        assert "stopped before the model was loaded" in server.log_text()
        assert_nothing_left(server, tree)
