"""A real router from PyPI (vllm-router or sglang-router, Rust binaries in their wheels) on 127.0.0.1."""
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from api_server import free_port, wait_for
from logged_process import LoggedProcess

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 120.0
# The routers poll /health (and vllm-router /get_load) on their own schedule; short intervals keep tests quick.
STARTUP_FLAGS = ["--health-check-interval-secs", "1", "--worker-startup-timeout-secs", "60",
                 "--worker-startup-check-interval", "1"]
VLLM_ROUTER = [str(BIN / "vllm-router"), *STARTUP_FLAGS]
SGLANG_ROUTER = [str(BIN / "sglang-router"), "launch", *STARTUP_FLAGS]


class RouterProcess(LoggedProcess):
    """``command``: VLLM_ROUTER or SGLANG_ROUTER; ready once it answers /v1/models through a worker."""

    def __init__(self, command: list[str], worker_urls: list[str], policy: str, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="router-", suffix=".log")[1])
        args = [*command, "--host", "127.0.0.1", "--port", str(self.port), "--policy", policy,
                "--worker-urls", *worker_urls, *flags]
        with open(self.log, "wb") as output:
            self.process = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_for(self.answers, STARTUP_TIMEOUT_S, f"{Path(command[0]).name} to route requests")
        except AssertionError:
            self.stop()
            raise AssertionError(f"the router did not start:\n{self.log_text()}") from None

    def answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the router exited with {self.process.returncode}:\n{self.log_text()}")
        return httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200
