"""A real server (embedded model) scraped by a real Prometheus: exact metrics after known traffic, and every
dashboard query run through Prometheus' HTTP API."""
import json
import math
import time
from dataclasses import dataclass

import httpx
import pytest
from live_processes import RATE_INTERVAL, PrometheusAPI, running_prometheus, running_server
from observability_files import load_dashboard, promtool_complaints, query_panels, substitute_variables
from prometheus_client.parser import text_string_to_metric_families

from model.embedded import EMBEDDED_MODEL_DIR

pytestmark = pytest.mark.timeout(600)

CORE_PANELS = {
    "Request rate by finish reason", "Error rate by status", "Running and waiting requests", "KV cache usage",
    "Time to first token", "Inter-token latency", "End-to-end latency", "Prompt and generation tokens/s",
    "Expert load (layer x expert)", "Expert load imbalance per layer",
}
WAIT_S = 60.0
IGNORE_EOS = {"ignore_eos": True}


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there are none)."""
    wanted = set(labels.items())
    return sum(v for (n, sample_labels), v in samples.items() if n == name and wanted <= sample_labels)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@dataclass
class Traffic:
    """What the known requests sent and got back, from the API's own usage reports."""

    finished: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_intervals: int = 0
    completions_ok: int = 0
    chat_ok: int = 0
    bad_requests: int = 0

    def count(self, usage: dict) -> None:
        self.finished += 1
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        self.token_intervals += usage["completion_tokens"] - 1


def abort_a_stream(client: httpx.Client, model: str) -> dict:
    """A client that goes away after the first streamed token (the engine then aborts the request); returns the
    metrics scraped while it was generating."""
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 2000, "stream": True, **IGNORE_EOS}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[len("data: "):])["choices"]:
                return scrape(str(client.base_url).rstrip("/"))
    raise AssertionError("the stream ended before its first token")


def send_known_traffic(client: httpx.Client, model: str) -> Traffic:
    traffic = Traffic()
    for prompt in ["The quick brown fox", "Hello there, how are", "One two three four five six"]:
        body = {"model": model, "prompt": prompt, "max_tokens": 4, **IGNORE_EOS}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] == "length"
        traffic.count(response.json()["usage"])
        traffic.completions_ok += 1
    for question in ["What is a mixture of experts?", "Name a colour."]:
        body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 3,
                "stream": True, "stream_options": {"include_usage": True}, **IGNORE_EOS}
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            chunks = [json.loads(line[len("data: "):]) for line in response.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        traffic.count(chunks[-1]["usage"])
        traffic.chat_ok += 1
    response = client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": -1})
    assert response.status_code == 400
    traffic.bad_requests += 1
    return traffic


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Server and Prometheus, the traffic, and Prometheus caught up with the final state."""
    workdir = tmp_path_factory.mktemp("live")
    with running_server(workdir) as server_url:
        with running_prometheus(workdir, server_url.removeprefix("http://")) as prometheus_url:
            prometheus = PrometheusAPI(prometheus_url)
            started = time.time()
            # Rates need a sample from before the traffic.
            wait_for(lambda: prometheus.scalar("count(dots_serve_info)") == 1, "Prometheus' first scrape")
            with httpx.Client(base_url=server_url, timeout=120) as client:
                model = client.get("/v1/models").json()["data"][0]["id"]
                during = abort_a_stream(client, model)
                wait_for(lambda: value(scrape(server_url), "dots_serve_request_success_total",
                                       finished_reason="abort") == 1, "the aborted stream to be counted")
                before = scrape(server_url)
                traffic = send_known_traffic(client, model)
            after = scrape(server_url)
            traffic_ended = time.time()
            # Two scrapes after the traffic: series born during it (a new status code) then have two samples.
            wait_for(lambda: prometheus.scalar("max(timestamp(dots_serve_info))") > traffic_ended + 1,
                     "Prometheus to scrape the server twice after the traffic")
            yield {"server": server_url, "prometheus": prometheus, "model": model, "started": started,
                   "during": during, "before": before, "after": after, "traffic": traffic}


def delta(stack: dict, name: str, **labels: str) -> float:
    return value(stack["after"], name, **labels) - value(stack["before"], name, **labels)


def test_counters_equal_what_was_sent(stack):
    traffic: Traffic = stack["traffic"]
    assert delta(stack, "dots_serve_request_success_total", finished_reason="length") == traffic.finished
    assert delta(stack, "dots_serve_request_success_total", finished_reason="stop") == 0
    assert delta(stack, "dots_serve_request_success_total", finished_reason="abort") == 0
    assert delta(stack, "dots_serve_prompt_tokens_total") == traffic.prompt_tokens
    assert delta(stack, "dots_serve_generation_tokens_total") == traffic.completion_tokens
    assert delta(stack, "dots_serve_request_failures_total") == traffic.bad_requests
    http = "dots_serve_http_requests_total"
    assert delta(stack, http, route="/v1/completions", method="POST", status="200") == traffic.completions_ok
    assert delta(stack, http, route="/v1/chat/completions", method="POST", status="200") == traffic.chat_ok
    assert delta(stack, http, route="/v1/completions", method="POST", status="400") == traffic.bad_requests


def test_histogram_counts_equal_what_was_sent(stack):
    traffic: Traffic = stack["traffic"]
    for name in ["time_to_first_token", "e2e_request_latency", "request_queue_time", "request_prefill_time",
                 "request_decode_time"]:
        assert delta(stack, f"dots_serve_{name}_seconds_count") == traffic.finished, name
        assert delta(stack, f"dots_serve_{name}_seconds_bucket", le="+Inf") == traffic.finished, name
    assert delta(stack, "dots_serve_inter_token_latency_seconds_count") == traffic.token_intervals
    assert delta(stack, "dots_serve_request_prompt_tokens_count") == traffic.finished
    assert delta(stack, "dots_serve_request_prompt_tokens_sum") == traffic.prompt_tokens
    assert delta(stack, "dots_serve_request_generation_tokens_sum") == traffic.completion_tokens
    assert delta(stack, "dots_serve_iteration_tokens_count") > 0


def test_gauges_return_to_idle_after_all_requests(stack):
    during = stack["during"]
    assert value(during, "dots_serve_requests_running") == 1
    assert value(during, "dots_serve_kv_cache_usage_ratio") > 0
    after = stack["after"]
    assert value(after, "dots_serve_requests_running") == 0
    assert value(after, "dots_serve_requests_waiting") == 0
    assert value(after, "dots_serve_kv_cache_usage_ratio") == 0
    prometheus: PrometheusAPI = stack["prometheus"]
    for gauge in ["dots_serve_requests_running", "dots_serve_requests_waiting", "dots_serve_kv_cache_usage_ratio"]:
        assert prometheus.scalar(f"sum({gauge})") == 0, gauge


def test_expert_counts_cover_every_token_of_every_moe_layer(stack):
    config = json.loads((EMBEDDED_MODEL_DIR / "config.json").read_text())
    moe_layers = {str(layer) for layer in range(config["first_k_dense_replace"], config["num_hidden_layers"])}
    after = stack["after"]
    expert_samples = {
        labels: count for (name, labels), count in after.items() if name == "dots_serve_moe_expert_tokens_total"
    }
    layers = {dict(labels)["layer"] for labels in expert_samples}
    assert layers == moe_layers
    tokens_forwarded = value(after, "dots_serve_iteration_tokens_sum")
    for layer in moe_layers:
        per_layer = {dict(labels)["expert"]: count for labels, count in expert_samples.items()
                     if dict(labels)["layer"] == layer}
        assert len(per_layer) == config["n_routed_experts"]
        assert sum(per_layer.values()) == tokens_forwarded * config["num_experts_per_tok"], layer


def test_live_metrics_pass_promtool_check_metrics(stack):
    body = httpx.get(f"{stack['server']}/metrics", timeout=30).content
    assert promtool_complaints(body) == []


def test_info_metric_describes_the_server(stack):
    [info] = [dict(labels) for (name, labels), _ in stack["after"].items() if name == "dots_serve_info"]
    assert info["model_name"] == stack["model"]
    assert info["block_size"] == "16"
    assert info["tensor_parallel_size"] == "1"
    # Resolved once the model has loaded: "auto" becomes what the engine actually runs.
    assert info["device"] == "cpu"
    assert info["dtype"] == "float32"
    assert int(info["num_kv_blocks"]) > 0
    assert info["weight_dtype"] == info["kv_cache_dtype"] == "float32"
    assert int(info["weight_bytes"]) > 1_000_000  # the embedded model's 2.8M parameters
    assert (info["attention_backend"], info["moe_backend"], info["cuda_graphs"]) == ("torch", "torch", "false")


def elapsed(stack: dict) -> str:
    return f"{math.ceil(time.time() - stack['started']) + 5}s"


def test_every_dashboard_query_runs_and_core_panels_have_data(stack):
    prometheus: PrometheusAPI = stack["prometheus"]
    # Evaluated up to exactly the last scrape, which with the one before it came after all the traffic.
    end = prometheus.scalar("max(timestamp(dots_serve_info))")
    start = end - math.ceil(end - stack["started"] + 5)
    checked = set()
    for panel in query_panels(load_dashboard()):
        for target in panel["targets"]:
            query = substitute_variables(target["expr"], stack["model"], RATE_INTERVAL, elapsed(stack))
            if target.get("instant"):
                series = [[result["value"]] for result in prometheus.instant(query, at=end)]
            else:
                series = [result["values"] for result in prometheus.range(query, start, end)]
            if panel["title"] in CORE_PANELS:
                values = [float(point[1]) for points in series for point in points]
                assert any(math.isfinite(v) for v in values), f"{panel['title']} {target['refId']}: no data"
                checked.add(panel["title"])
    assert checked == CORE_PANELS


def test_heatmap_has_one_cell_per_layer_and_expert(stack):
    [heatmap] = [panel for panel in query_panels(load_dashboard()) if panel["type"] == "heatmap"]
    query = substitute_variables(heatmap["targets"][0]["expr"], stack["model"], RATE_INTERVAL, elapsed(stack))
    cells = stack["prometheus"].instant(query)
    config = json.loads((EMBEDDED_MODEL_DIR / "config.json").read_text())
    moe_layers = config["num_hidden_layers"] - config["first_k_dense_replace"]
    assert len(cells) == moe_layers * config["n_routed_experts"]
    assert {tuple(sorted(cell["metric"])) for cell in cells} == {("expert", "layer")}


def test_no_alert_fires_on_a_healthy_server(stack):
    firing = [alert for alert in stack["prometheus"].alerts() if alert["state"] == "firing"]
    assert firing == []


def test_no_expert_metrics_flag_turns_expert_counts_off(tmp_path):
    with running_server(tmp_path, "--no-expert-metrics") as url, httpx.Client(base_url=url, timeout=120) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        response = client.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})
        assert response.status_code == 200
        samples = scrape(url)
    assert value(samples, "dots_serve_request_success_total") == 1
    assert value(samples, "dots_serve_iteration_tokens_count") > 0
    assert not any(name == "dots_serve_moe_expert_tokens_total" for name, _ in samples)
