"""What the engine records for observability. The engine fills these in; a listener (the metrics exporter) reads
them."""
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class RequestStats:
    """Times are ``time.monotonic()`` seconds; ``arrival_time`` is when the server received the request."""

    request_id: str
    arrival_time: float
    prompt_tokens: int = 0
    generation_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each generated token (all choices) was produced
    finished_time: float | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    num_preemptions: int = 0
    num_cached_tokens: int = 0


@dataclass
class StepStats:
    duration_s: float
    num_seqs: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1; cached blocks nobody references count as free
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache this step
    prefix_cache_hits: int  # of those, tokens found
    num_preemptions: int
    num_grammar_rejections: int = 0  # sampled tokens a request's grammar refused (each fails its request)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


class StatsListener(Protocol):
    """Called from the engine thread; implementations must be cheap and thread-safe."""

    def on_step(self, step: StepStats) -> None: ...

    def on_request_finished(self, request: RequestStats) -> None: ...

    def on_expert_counts(self, layer_ids: list[int], counts: torch.Tensor) -> None:
        """``counts[i, e]``: token-expert assignments of layer ``layer_ids[i]`` since the previous flush (int64,
        CPU)."""
        ...
