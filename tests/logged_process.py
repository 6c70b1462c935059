"""A subprocess of the tests (a server, a router) whose output goes to a log file, stopped and cleaned up alike."""
import subprocess
from pathlib import Path


class LoggedProcess:
    """Subclasses start ``self.process`` with its output in ``self.log``; a context manager that stops it."""

    process: subprocess.Popen
    log: Path
    stop_timeout_s: float = 30.0  # after SIGTERM, before SIGKILL

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self.log.unlink(missing_ok=True)
