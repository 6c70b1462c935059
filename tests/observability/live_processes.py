"""Real processes for the live observability tests: a dots-serve server and a Prometheus scraping it, on 127.0.0.1."""
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import yaml
from observability_files import ALERTS, REPO, require_tool

STARTUP_TIMEOUT_S = 240.0
SCRAPE_INTERVAL = "1s"
# What Grafana's $__rate_interval becomes for this scrape interval: four scrapes.
RATE_INTERVAL = "4s"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, process: subprocess.Popen,
               log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {process.returncode}:\n{tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if condition():
                return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s} s:\n{tail(log)}")


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def running_process(args: list[str], log: Path, ready_url: str, what: str) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as output:
        process = subprocess.Popen(args, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: httpx.get(ready_url, timeout=5).status_code == 200, STARTUP_TIMEOUT_S, what,
                       process, log)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def running_server(workdir: Path, *flags: str) -> Iterator[str]:
    """``python -m server`` with the embedded model; yields its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--shutdown-timeout", "5",
            *flags]
    with running_process(args, workdir / f"server-{port}.log", f"{url}/ready", "dots-serve"):
        yield url


@contextlib.contextmanager
def running_prometheus(workdir: Path, target: str) -> Iterator[str]:
    """Prometheus scraping ``target`` (host:port) every second with the shipped alert rules; yields its URL."""
    port = free_port()
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "dots-serve", "static_configs": [{"targets": [target]}]}],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    (workdir / "tsdb").mkdir()
    args = [
        require_tool("prometheus"), f"--config.file={config_file}", f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]
    url = f"http://127.0.0.1:{port}"
    with running_process(args, workdir / "prometheus.log", f"{url}/-/ready", "prometheus"):
        yield url


class PrometheusAPI:
    def __init__(self, url: str) -> None:
        self.url = url

    def _get(self, path: str, params: dict) -> dict:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=30)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (params, body)
        return body["data"]

    def instant(self, query: str, at: float | None = None) -> list[dict]:
        params = {"query": query} if at is None else {"query": query, "time": f"{at:.3f}"}
        return self._get("/api/v1/query", params)["result"]

    def range(self, query: str, start: float, end: float, step_s: int = 1) -> list[dict]:
        params = {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s}s"}
        return self._get("/api/v1/query_range", params)["result"]

    def alerts(self) -> list[dict]:
        return self._get("/api/v1/alerts", {})["alerts"]

    def scalar(self, query: str) -> float | None:
        result = self.instant(query)
        return float(result[0]["value"][1]) if result else None
