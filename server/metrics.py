"""Prometheus metrics for GET /metrics: engine step and request statistics, HTTP traffic, MoE expert load.

Each ``ServerMetrics`` owns a private registry, so several servers (or tests) can live in one process.
The engine calls ``stats_listener`` from its own thread; prometheus-client metrics are thread-safe.
"""
import prometheus_client
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from scheduler.stats import RequestStats, StatsListener, StepStats
from server.vllm_metrics import VllmMetricAliases

PREFIX = "dots_serve"
SUCCESS_FINISH_REASONS = ("stop", "length", "abort")
ENGINE_ERROR_REASON = "engine_error"
INFO_LABELS = ("version", "model", "dtype", "device", "tensor_parallel_size", "block_size", "num_kv_blocks",
               "weight_dtype", "weight_bytes", "kv_cache_dtype", "attention_backend", "moe_backend", "cuda_graphs")

# Seconds, from a millisecond to ten minutes: a cached short prompt on a GPU up to a long generation on a CPU.
REQUEST_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 60.0, 120.0, 240.0, 480.0, 600.0,
)
# Seconds between two tokens of one request, and the duration of one engine step.
TOKEN_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
    0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
)
TOKEN_COUNT_BUCKETS = tuple(float(2**i) for i in range(18))  # 1 .. 131072 tokens


class ServerMetrics:
    """All metrics of one served model; ``render()`` gives the body and content type of GET /metrics.
    ``vllm_aliases``: also export the router-facing series under vLLM's names (see vllm_metrics.py)."""

    def __init__(self, model_name: str, info: dict[str, str], vllm_aliases: bool = True) -> None:
        # Without this every counter and histogram also exports a *_created series, doubling the series count.
        prometheus_client.disable_created_metrics()
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.stats_listener: StatsListener = self
        labels = ["model_name"]
        self.vllm = VllmMetricAliases(self.registry, model_name) if vllm_aliases else None

        # Metrics without labels of their own are bound to this model once, here.
        def labelled_counter(name: str, doc: str, extra_labels: tuple[str, ...]) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels + list(extra_labels), registry=self.registry)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=self.registry).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, labels, buckets=buckets, registry=self.registry).labels(
                model_name
            )

        self._info = Info(PREFIX, "Build and engine configuration of the server.", labels, registry=self.registry)
        self._info_labels: dict[str, str] = {}
        self.update_info(info)

        # No series until the server first reports its readiness, so an unreported state never looks "not ready".
        self.ready = Gauge(
            f"{PREFIX}_ready", "1 while the server takes requests, 0 while loading or draining.", labels,
            registry=self.registry,
        )
        self.requests_running = gauge("requests_running", "Requests in the engine's running batch.")
        self.requests_waiting = gauge("requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge(
            "kv_cache_usage_ratio", "Fraction of KV cache blocks in use (unreferenced cached blocks count as free)."
        )

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests (all choices).")
        self.preemptions = counter("preemptions", "Sequences preempted for lack of KV cache blocks.")
        self.grammar_rejections = counter(
            "grammar_rejected_tokens", "Sampled tokens the request's grammar refused; each fails its request."
        )
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.request_success = labelled_counter(
            "request_success", "Requests finished by the engine, by finish reason.", ("finished_reason",)
        )
        self.request_failures = labelled_counter(
            "request_failures", "Requests rejected by the server or failed in the engine, by cause.", ("reason",)
        )
        self.http_requests = labelled_counter(
            "http_requests", "HTTP requests answered, by route template, method and status.",
            ("route", "method", "status"),
        )
        self.expert_tokens = labelled_counter(
            "moe_expert_tokens", "Token-expert assignments of the MoE router.", ("layer", "expert")
        )
        for reason in SUCCESS_FINISH_REASONS:
            self.request_success.labels(model_name, reason)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "From arrival at the server to the first generated token.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Between consecutive generated tokens of a request.", TOKEN_LATENCY_BUCKETS
        )
        self.e2e_latency = histogram(
            "e2e_request_latency_seconds", "From arrival at the server to the end of the request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "request_queue_time_seconds", "From arrival to first being scheduled.", REQUEST_LATENCY_BUCKETS
        )
        self.prefill_time = histogram(
            "request_prefill_time_seconds", "From first being scheduled to the first token.", REQUEST_LATENCY_BUCKETS
        )
        self.decode_time = histogram(
            "request_decode_time_seconds", "From the first token to the end of the request.", REQUEST_LATENCY_BUCKETS
        )
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per request.", TOKEN_COUNT_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per request (all choices).", TOKEN_COUNT_BUCKETS
        )
        self.iteration_tokens = histogram(
            "iteration_tokens", "Tokens (prefill and decode) computed per engine step.", TOKEN_COUNT_BUCKETS
        )
        self.step_duration = histogram("step_duration_seconds", "Wall time of one engine step.", TOKEN_LATENCY_BUCKETS)

    # Server side.

    def observe_http(self, route: str, method: str, status: int) -> None:
        self.http_requests.labels(self.model_name, route, method, str(status)).inc()

    def record_rejected(self, reason: str) -> None:
        if reason == ENGINE_ERROR_REASON:
            return  # the engine reports these itself (finish reason "error"); counting both would count them twice
        self.request_failures.labels(self.model_name, reason).inc()

    def update_info(self, info: dict[str, str]) -> None:
        """Merges ``info`` into the info metric's labels (some, like the KV block count, are known only once loaded)."""
        unknown = set(info) - set(INFO_LABELS)
        if unknown:
            raise ValueError(f"unknown info labels {sorted(unknown)}; expected a subset of {list(INFO_LABELS)}")
        self._info_labels |= {key: str(value) for key, value in info.items()}
        self._info.labels(self.model_name).info(self._info_labels)
        if self.vllm is not None and {"block_size", "num_kv_blocks"} <= set(self._info_labels):
            self.vllm.set_cache_config(self._info_labels["block_size"], self._info_labels["num_kv_blocks"])

    def set_ready(self, ready: bool) -> None:
        self.ready.labels(self.model_name).set(1 if ready else 0)

    def set_gauges(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        self.requests_running.set(running)
        self.requests_waiting.set(waiting)
        self.kv_cache_usage.set(kv_cache_usage)
        if self.vllm is not None:
            self.vllm.set_gauges(running, waiting, kv_cache_usage)

    def render(self) -> tuple[bytes, str]:
        # Every name here is a classic Prometheus name, so the 0.0.4 text format that all scrapers read is exact.
        return prometheus_client.generate_latest(self.registry), prometheus_client.CONTENT_TYPE_PLAIN_0_0_4

    # StatsListener: called from the engine thread.

    def on_step(self, step: StepStats) -> None:
        self.set_gauges(step.num_running, step.num_waiting, step.kv_cache_usage)
        self.preemptions.inc(step.num_preemptions)
        self.grammar_rejections.inc(step.num_grammar_rejections)
        self.prefix_cache_queries.inc(step.prefix_cache_queries)
        self.prefix_cache_hits.inc(step.prefix_cache_hits)
        if self.vllm is not None:
            self.vllm.on_step(step)
        if step.num_seqs > 0:
            self.iteration_tokens.observe(step.num_tokens)
            self.step_duration.observe(step.duration_s)

    def on_request_finished(self, request: RequestStats) -> None:
        if request.finish_reason == "error":
            self.request_failures.labels(self.model_name, ENGINE_ERROR_REASON).inc()
        elif request.finish_reason is not None:
            self.request_success.labels(self.model_name, request.finish_reason).inc()
        self.prompt_tokens.inc(request.prompt_tokens)
        self.generation_tokens.inc(request.generation_tokens)
        if self.vllm is not None:
            self.vllm.on_request_finished(request)
        self.request_prompt_tokens.observe(request.prompt_tokens)
        self.request_generation_tokens.observe(request.generation_tokens)
        if request.finished_time is not None:
            self.e2e_latency.observe(request.finished_time - request.arrival_time)
        if request.first_scheduled_time is not None:
            self.queue_time.observe(request.first_scheduled_time - request.arrival_time)
        if request.first_token_time is not None:
            self.time_to_first_token.observe(request.first_token_time - request.arrival_time)
            if request.first_scheduled_time is not None:
                self.prefill_time.observe(request.first_token_time - request.first_scheduled_time)
            if request.finished_time is not None:
                self.decode_time.observe(request.finished_time - request.first_token_time)
        # Choices of one request (n > 1) produce their tokens in the same step, at the same time; the latency
        # a client sees is between distinct steps.
        step_times = sorted(set(request.token_times))
        for previous, current in zip(step_times, step_times[1:]):
            self.inter_token_latency.observe(current - previous)

    def on_expert_counts(self, layer_ids: list[int], counts: torch.Tensor) -> None:
        if counts.shape[0] != len(layer_ids):
            raise ValueError(f"expert counts have {counts.shape[0]} rows for {len(layer_ids)} layers")
        for layer_id, layer_counts in zip(layer_ids, counts.tolist()):
            for expert_id, count in enumerate(layer_counts):
                self.expert_tokens.labels(self.model_name, str(layer_id), str(expert_id)).inc(count)
