"""vLLM's names for the load and cache series that routers read, beside dots-serve's own.

The llm-d endpoint picker (Gateway API inference extension) reads ``vllm:*`` names from any endpoint it has no other
engine configuration for, so exporting them makes a replica routable with zero configuration. Each series is the same
quantity as a ``dots_serve_*`` one, updated at the same moment; the help text says so, and ``--no-vllm-metrics``
drops them. One series per name: the picker's handling of several is undefined.
"""
from prometheus_client import CollectorRegistry, Counter, Gauge

from scheduler.stats import RequestStats, StepStats

ENGINE_INDEX = "0"  # vLLM labels each engine core of a data-parallel replica; dots-serve has one
ALIAS_NOTE = "dots-serve alias of {native}, under vLLM's name for routers (--no-vllm-metrics drops it)."


class VllmMetricAliases:
    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        labels = ("model_name", "engine")
        values = (model_name, ENGINE_INDEX)
        self._values = values

        def gauge(name: str, native: str) -> Gauge:
            return Gauge(name, ALIAS_NOTE.format(native=native), labels, registry=registry).labels(*values)

        def counter(name: str, native: str) -> Counter:
            return Counter(name, ALIAS_NOTE.format(native=native), labels, registry=registry).labels(*values)

        self.running = gauge("vllm:num_requests_running", "dots_serve_requests_running")
        self.waiting = gauge("vllm:num_requests_waiting", "dots_serve_requests_waiting")
        # A 0-1 fraction despite the name, as in vLLM.
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc", "dots_serve_kv_cache_usage_ratio")
        self.prefix_cache_queries = counter("vllm:prefix_cache_queries", "dots_serve_prefix_cache_queries_total")
        self.prefix_cache_hits = counter("vllm:prefix_cache_hits", "dots_serve_prefix_cache_hits_total")
        self.prompt_tokens = counter("vllm:prompt_tokens", "dots_serve_prompt_tokens_total")
        self.generation_tokens = counter("vllm:generation_tokens", "dots_serve_generation_tokens_total")
        # No series until the KV cache is sized: a block count of 0 would read as a full cache.
        self.cache_config = Gauge(
            "vllm:cache_config_info",
            ALIAS_NOTE.format(native="the block_size and num_kv_blocks labels of dots_serve_info") + " Always 1.",
            (*labels, "block_size", "num_gpu_blocks"), registry=registry,
        )

    def set_gauges(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_cache_usage.set(kv_cache_usage)

    def set_cache_config(self, block_size: str, num_blocks: str) -> None:
        self.cache_config.clear()  # keeps it to one series if the engine is ever sized again
        self.cache_config.labels(*self._values, block_size, num_blocks).set(1)

    def on_step(self, step: StepStats) -> None:
        self.prefix_cache_queries.inc(step.prefix_cache_queries)
        self.prefix_cache_hits.inc(step.prefix_cache_hits)

    def on_request_finished(self, request: RequestStats) -> None:
        self.prompt_tokens.inc(request.prompt_tokens)
        self.generation_tokens.inc(request.generation_tokens)
