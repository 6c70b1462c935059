"""One info line per finished generation request: ids, token counts, finish reasons, timings."""
import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("dots_serve.requests")


@dataclass
class RequestRecord:
    completion_id: str
    request_id: str  # X-Request-Id
    route: str
    arrival_time: float  # time.monotonic()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    first_token_time: float | None = None
    outcome: str = "ok"  # ok, error, disconnected
    prompt_text: str | None = None
    logged: bool = False

    def saw_tokens(self, count: int) -> None:
        if count and self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.completion_tokens += count

    def log(self, log_prompts: bool) -> None:
        if self.logged:
            return
        self.logged = True
        now = time.monotonic()
        ttft = "-" if self.first_token_time is None else f"{self.first_token_time - self.arrival_time:.3f}s"
        decode_tokens = self.completion_tokens - len(self.finish_reasons)
        tpot = "-"
        if self.first_token_time is not None and decode_tokens > 0:
            tpot = f"{(now - self.first_token_time) / decode_tokens * 1000:.1f}ms"
        line = (
            f"{self.completion_id} {self.route} request_id={self.request_id} outcome={self.outcome} "
            f"prompt_tokens={self.prompt_tokens} completion_tokens={self.completion_tokens} "
            f"finish_reason={','.join(self.finish_reasons) or '-'} ttft={ttft} tpot={tpot} "
            f"e2e={now - self.arrival_time:.3f}s"
        )
        if log_prompts and self.prompt_text is not None:
            line += f" prompt={self.prompt_text!r}"
        logger.info(line)
