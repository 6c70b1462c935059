"""A real ``python -m server`` subprocess on 127.0.0.1 with the embedded model, for the API tests."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from logged_process import LoggedProcess

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180.0
# Small engine budgets keep start-up and every step short on a 2-core CPU.
# One intra-op thread: the tiny model does not gain from more, and the test machine's cores are shared.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FAST_ENGINE_FLAGS = ["--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "32MiB", "--max-num-seqs", "32",
                     "--max-num-batched-tokens", "1024", "--no-expert-metrics"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if condition():
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class ServerProcess(LoggedProcess):
    """``own_process_group``: the server leads a process group of its own (as under systemd or docker), so that a
    signal to the group reaches its whole tree and nothing else. ``until_ready=False``: return once it answers
    /health (still loading the model)."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None, own_process_group: bool = False,
                 until_ready: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="dots-serve-", suffix=".log")[1])
        args = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
                *FAST_ENGINE_FLAGS, *flags]
        with open(self.log, "wb") as output:
            self.process = subprocess.Popen(
                args, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                env={**os.environ, **THREAD_ENV, **(env or {})}, start_new_session=own_process_group,
            )
        try:
            wait_for(self.is_ready if until_ready else self.is_listening, STARTUP_TIMEOUT_S,
                     "the server to become ready" if until_ready else "the server to listen")
        except AssertionError:
            self.stop()
            raise AssertionError(f"the server did not become ready:\n{self.log_text()}") from None

    def is_ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log_text()}")
        return httpx.get(f"{self.url}/ready", timeout=5).status_code == 200

    def is_listening(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log_text()}")
        return httpx.get(f"{self.url}/health", timeout=5).status_code == 200

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        """The signal to every process of the server's group (needs ``own_process_group``)."""
        os.killpg(self.process.pid, signum)

    def wait(self, timeout_s: float = 60.0) -> int:
        return self.process.wait(timeout=timeout_s)
