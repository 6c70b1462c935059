"""A real ``python -m server --tensor-parallel-size 2`` subprocess on 127.0.0.1, and its worker processes."""
import os
import re
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
TP_FLAGS = ["--tensor-parallel-size", "2", "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "16MiB",
            "--max-num-seqs", "8", "--max-num-batched-tokens", "256", "--no-expert-metrics"]
WORKER_PID_LINE = re.compile(r"tensor-parallel rank 1: worker process pid (\d+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class TensorParallelServer(LoggedProcess):
    stop_timeout_s = 60.0  # two processes, each with a model, to stop

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="dots-serve-tp-", suffix=".log")[1])
        args = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port), *TP_FLAGS]
        with open(self.log, "wb") as output:
            self.process = subprocess.Popen(args, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, env=os.environ)
        try:
            wait_until(self.is_ready, STARTUP_TIMEOUT_S, "the server to become ready")
        except AssertionError:
            self.stop()
            raise AssertionError(f"the server did not become ready:\n{self.log_text()}") from None
        match = WORKER_PID_LINE.search(self.log_text())
        assert match is not None, self.log_text()
        self.worker_pid = int(match.group(1))

    def is_ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log_text()}")
        return httpx.get(f"{self.url}/ready", timeout=5).status_code == 200

    def health_status(self) -> int:
        return httpx.get(f"{self.url}/health", timeout=5).status_code
