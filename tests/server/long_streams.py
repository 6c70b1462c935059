"""Streaming completions that keep a replica busy until the test closes them (closing aborts them server-side)."""
import threading

import httpx

MODEL = "dots1-tiny"


class LongStream:
    """One streaming completion of ``max_tokens`` tokens (EOS ignored) read on a thread until ``close()``."""

    def __init__(self, url: str, prompt: str = "In the beginning", max_tokens: int = 1500) -> None:
        self.chunks = 0
        self.status: int | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        payload = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        self._thread = threading.Thread(target=self._run, args=(url, payload), daemon=True)
        self._thread.start()

    def _run(self, url: str, payload: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=300) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        self.chunks += 1
                    if self._stop.is_set():
                        return
        except BaseException as error:
            self.error = error

    def request_stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.request_stop()
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "a long stream did not end after being closed"
        assert self.error is None, self.error


class LongStreams:
    def __init__(self, url: str, count: int, **body: object) -> None:
        self.streams = [LongStream(url, **body) for _ in range(count)]

    def close(self) -> None:
        for stream in self.streams:
            stream.request_stop()
        for stream in self.streams:
            stream.close()

    def __enter__(self) -> "LongStreams":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
