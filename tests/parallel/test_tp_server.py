"""``python -m server --tensor-parallel-size 2`` end to end: chat over two ranks, a dead worker takes /health to 503,
and no worker outlives the server."""
import os
import signal
import subprocess

import openai
import pytest
from process_table import ignored_signals, is_running, parent_pid
from tp_server import TensorParallelServer, wait_until

DEADLINE_S = 30.0  # generous: the watchdog polls every 0.2 s


def test_chat_over_two_ranks_then_a_killed_worker_makes_health_503():
    with TensorParallelServer() as server:
        # The engine process (rank 0) is the server's child and the worker's parent.
        assert parent_pid(parent_pid(server.worker_pid)) == server.process.pid
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="dots1-tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens > 0
        assert server.health_status() == 200

        os.kill(server.worker_pid, signal.SIGKILL)
        wait_until(lambda: server.health_status() == 503, DEADLINE_S, "/health to report the dead engine")
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="dots1-tiny", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4)
        assert refused.value.status_code == 503
        log = server.log_text()
        assert f"tensor-parallel worker rank 1 (pid {server.worker_pid}) was killed by SIGKILL" in log
        assert log.count("the engine cannot continue") == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["shutdown", "server_killed"])
def test_no_worker_outlives_the_server(signum):
    with TensorParallelServer() as server:
        assert is_running(server.worker_pid)
        assert {signal.SIGTERM, signal.SIGINT} <= ignored_signals(server.worker_pid)  # only the server decides
        server.process.send_signal(signum)
        try:
            code = server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit:\n{server.log_text()}") from None
        if signum == signal.SIGTERM:
            assert code == 0, server.log_text()
            assert "resource_tracker" not in server.log_text()  # no semaphore left behind by the children
        wait_until(lambda: not is_running(server.worker_pid), DEADLINE_S, "the worker to exit")
