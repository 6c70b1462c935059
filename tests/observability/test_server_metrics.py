"""ServerMetrics fed with known engine statistics: exact counters, histogram counts and sums, valid exposition."""
import subprocess

import pytest
import torch
from observability_files import INFO, populated_metrics, promtool_complaints, require_tool

from scheduler.stats import RequestStats, StepStats
from server.metrics import ServerMetrics

MODEL = "dots1-tiny"


def sample(metrics: ServerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model_name": MODEL, **labels})


def step(**overrides) -> StepStats:
    values = dict(
        duration_s=0.02, num_seqs=2, num_prefill_tokens=30, num_decode_tokens=2, num_running=2, num_waiting=1,
        kv_cache_usage=0.5, prefix_cache_queries=30, prefix_cache_hits=16, num_preemptions=0,
    )
    values.update(overrides)
    return StepStats(**values)


def finished(request_id: str = "r", **overrides) -> RequestStats:
    values = dict(
        request_id=request_id, arrival_time=100.0, prompt_tokens=7, generation_tokens=4,
        first_scheduled_time=100.25, first_token_time=100.75, token_times=[100.75, 100.78125, 100.875, 101.5],
        finished_time=101.5, finish_reason="stop",
    )
    values.update(overrides)
    return RequestStats(**values)


@pytest.fixture
def metrics() -> ServerMetrics:
    return ServerMetrics(MODEL, INFO)


def test_finished_request_fills_every_request_histogram(metrics):
    metrics.on_request_finished(finished())

    assert sample(metrics, "dots_serve_request_success_total", finished_reason="stop") == 1
    assert sample(metrics, "dots_serve_request_success_total", finished_reason="length") == 0
    assert sample(metrics, "dots_serve_prompt_tokens_total") == 7
    assert sample(metrics, "dots_serve_generation_tokens_total") == 4
    expected_seconds = {
        "time_to_first_token": 0.75, "e2e_request_latency": 1.5, "request_queue_time": 0.25,
        "request_prefill_time": 0.5, "request_decode_time": 0.75,
    }
    for name, seconds in expected_seconds.items():
        assert sample(metrics, f"dots_serve_{name}_seconds_count") == 1, name
        assert sample(metrics, f"dots_serve_{name}_seconds_sum") == pytest.approx(seconds), name
    # TTFT 0.75 s lies in the bucket bounded by 0.75, not in the one below.
    assert sample(metrics, "dots_serve_time_to_first_token_seconds_bucket", le="0.5") == 0
    assert sample(metrics, "dots_serve_time_to_first_token_seconds_bucket", le="0.75") == 1
    assert sample(metrics, "dots_serve_inter_token_latency_seconds_count") == 3
    assert sample(metrics, "dots_serve_inter_token_latency_seconds_sum") == pytest.approx(0.75)
    # Intervals 0.03125, 0.09375 and 0.625 s (binary fractions, so bucket edges compare exactly).
    assert sample(metrics, "dots_serve_inter_token_latency_seconds_bucket", le="0.03") == 0
    assert sample(metrics, "dots_serve_inter_token_latency_seconds_bucket", le="0.04") == 1
    assert sample(metrics, "dots_serve_inter_token_latency_seconds_bucket", le="0.1") == 2
    assert sample(metrics, "dots_serve_inter_token_latency_seconds_bucket", le="0.5") == 2
    assert sample(metrics, "dots_serve_inter_token_latency_seconds_bucket", le="0.75") == 3
    assert sample(metrics, "dots_serve_request_prompt_tokens_sum") == 7
    assert sample(metrics, "dots_serve_request_prompt_tokens_bucket", le="4.0") == 0
    assert sample(metrics, "dots_serve_request_prompt_tokens_bucket", le="8.0") == 1
    assert sample(metrics, "dots_serve_request_generation_tokens_count") == 1


def test_choices_of_one_request_produced_in_the_same_step_count_one_interval(metrics):
    # n=2: both choices get a token at each of three steps.
    metrics.on_request_finished(finished(generation_tokens=6, token_times=[1.0, 1.0, 1.5, 1.5, 1.75, 1.75]))

    assert sample(metrics, "dots_serve_inter_token_latency_seconds_count") == 2
    assert sample(metrics, "dots_serve_inter_token_latency_seconds_sum") == pytest.approx(0.75)
    assert sample(metrics, "dots_serve_generation_tokens_total") == 6


def test_finish_reasons_split_into_successes_and_engine_failures(metrics):
    for reason in ["stop", "stop", "length", "abort", "error"]:
        metrics.on_request_finished(finished(finish_reason=reason))

    assert sample(metrics, "dots_serve_request_success_total", finished_reason="stop") == 2
    assert sample(metrics, "dots_serve_request_success_total", finished_reason="length") == 1
    assert sample(metrics, "dots_serve_request_success_total", finished_reason="abort") == 1
    assert sample(metrics, "dots_serve_request_success_total", finished_reason="error") is None
    assert sample(metrics, "dots_serve_request_failures_total", reason="engine_error") == 1
    assert sample(metrics, "dots_serve_e2e_request_latency_seconds_count") == 5


def test_engine_errors_count_once_when_the_server_also_reports_them(metrics):
    metrics.on_request_finished(finished(finish_reason="error"))
    metrics.record_rejected("engine_error")  # the server turning the same failure into an HTTP error

    assert sample(metrics, "dots_serve_request_failures_total", reason="engine_error") == 1


def test_request_aborted_while_waiting_has_only_end_to_end_latency(metrics):
    metrics.on_request_finished(
        finished(first_scheduled_time=None, first_token_time=None, token_times=[], generation_tokens=0,
                 finished_time=103.0, finish_reason="abort")
    )

    assert sample(metrics, "dots_serve_e2e_request_latency_seconds_sum") == pytest.approx(3.0)
    for name in ["time_to_first_token", "request_queue_time", "request_prefill_time", "request_decode_time",
                 "inter_token_latency"]:
        assert sample(metrics, f"dots_serve_{name}_seconds_count") == 0, name


def test_steps_accumulate_counters_and_the_latest_step_sets_the_gauges(metrics):
    metrics.on_step(step())
    metrics.on_step(step(num_prefill_tokens=0, num_decode_tokens=3, num_running=3, num_waiting=0,
                         kv_cache_usage=0.75, prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=2))

    assert sample(metrics, "dots_serve_requests_running") == 3
    assert sample(metrics, "dots_serve_requests_waiting") == 0
    assert sample(metrics, "dots_serve_kv_cache_usage_ratio") == 0.75
    assert sample(metrics, "dots_serve_preemptions_total") == 2
    assert sample(metrics, "dots_serve_prefix_cache_queries_total") == 30
    assert sample(metrics, "dots_serve_prefix_cache_hits_total") == 16
    assert sample(metrics, "dots_serve_iteration_tokens_count") == 2
    assert sample(metrics, "dots_serve_iteration_tokens_sum") == 35
    assert sample(metrics, "dots_serve_step_duration_seconds_count") == 2
    assert sample(metrics, "dots_serve_step_duration_seconds_sum") == pytest.approx(0.04)


def test_idle_step_clears_the_gauges_without_counting_a_step(metrics):
    metrics.on_step(step())
    metrics.on_step(step(duration_s=0.0, num_seqs=0, num_prefill_tokens=0, num_decode_tokens=0, num_running=0,
                         num_waiting=0, kv_cache_usage=0.0, prefix_cache_queries=0, prefix_cache_hits=0))

    assert sample(metrics, "dots_serve_requests_running") == 0
    assert sample(metrics, "dots_serve_requests_waiting") == 0
    assert sample(metrics, "dots_serve_kv_cache_usage_ratio") == 0
    assert sample(metrics, "dots_serve_iteration_tokens_count") == 1


def test_set_gauges_overrides_the_last_step(metrics):
    metrics.on_step(step())
    metrics.set_gauges(running=0, waiting=0, kv_cache_usage=0.0)

    assert sample(metrics, "dots_serve_requests_running") == 0
    assert sample(metrics, "dots_serve_kv_cache_usage_ratio") == 0


def test_expert_counts_accumulate_per_layer_and_expert(metrics):
    metrics.on_expert_counts([1, 3], torch.tensor([[5, 0, 2], [1, 1, 1]], dtype=torch.int64))
    metrics.on_expert_counts([1, 3], torch.tensor([[1, 4, 0], [0, 0, 9]], dtype=torch.int64))

    expected = {("1", "0"): 6, ("1", "1"): 4, ("1", "2"): 2, ("3", "0"): 1, ("3", "1"): 1, ("3", "2"): 10}
    for (layer, expert), count in expected.items():
        assert sample(metrics, "dots_serve_moe_expert_tokens_total", layer=layer, expert=expert) == count


def test_expert_counts_for_the_wrong_number_of_layers_are_refused(metrics):
    with pytest.raises(ValueError, match="2 rows for 3 layers"):
        metrics.on_expert_counts([1, 2, 3], torch.zeros(2, 4, dtype=torch.int64))


def test_http_requests_rejections_and_readiness(metrics):
    metrics.observe_http("/v1/chat/completions", "POST", 200)
    metrics.observe_http("/v1/chat/completions", "POST", 200)
    metrics.observe_http("/v1/chat/completions", "POST", 429)
    metrics.record_rejected("rate_limited")
    metrics.record_rejected("context_length_exceeded")
    assert sample(metrics, "dots_serve_ready") is None
    metrics.set_ready(True)

    http = "dots_serve_http_requests_total"
    assert sample(metrics, http, route="/v1/chat/completions", method="POST", status="200") == 2
    assert sample(metrics, http, route="/v1/chat/completions", method="POST", status="429") == 1
    assert sample(metrics, "dots_serve_request_failures_total", reason="rate_limited") == 1
    assert sample(metrics, "dots_serve_request_failures_total", reason="context_length_exceeded") == 1
    assert sample(metrics, "dots_serve_ready") == 1
    metrics.set_ready(False)
    assert sample(metrics, "dots_serve_ready") == 0


def test_info_metric_carries_the_configuration(metrics):
    assert sample(metrics, "dots_serve_info", **INFO) == 1


def test_unknown_info_label_is_refused():
    with pytest.raises(ValueError, match="unknown info labels"):
        ServerMetrics(MODEL, {**INFO, "gpu": "h100"})


def test_each_instance_has_its_own_registry():
    first, second = ServerMetrics("a", INFO), ServerMetrics("b", INFO)
    first.on_request_finished(finished())

    assert first.registry.get_sample_value("dots_serve_prompt_tokens_total", {"model_name": "a"}) == 7
    assert second.registry.get_sample_value("dots_serve_prompt_tokens_total", {"model_name": "b"}) == 0
    assert b'model_name="a"' not in second.render()[0]


def test_rendered_metrics_pass_promtool_check_metrics():
    body, content_type = populated_metrics().render()

    assert content_type.startswith("text/plain; version=0.0.4")
    assert b"_created" not in body
    assert b"vllm:num_requests_waiting" in body  # the aliases are there, and are the only lint allowed
    assert promtool_complaints(body) == []


def test_promtool_check_metrics_rejects_a_malformed_exposition():
    broken = b"# TYPE dots_serve_x counter\ndots_serve_x{model_name=\"m\" 1\n"
    result = subprocess.run(
        [require_tool("promtool"), "check", "metrics"], input=broken, capture_output=True, timeout=60
    )
    assert result.returncode != 0
