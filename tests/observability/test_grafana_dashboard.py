"""The provisioned Grafana dashboard: every panel has a datasource and valid PromQL over exported metrics."""
import subprocess

import yaml
from observability_files import (
    DASHBOARD,
    DEPLOY,
    exported_sample_names,
    load_dashboard,
    metric_names_in,
    populated_metrics,
    query_panels,
    require_tool,
    substitute_variables,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Panel title -> metric names its queries must read (the panels the issue lists, and the server table).
REQUIRED_PANELS = {
    "Server": {"dots_serve_info"},
    "Request rate by finish reason": {"dots_serve_request_success_total", "dots_serve_request_failures_total"},
    "Error rate by status": {"dots_serve_http_requests_total"},
    "Running and waiting requests": {"dots_serve_requests_running", "dots_serve_requests_waiting"},
    "KV cache usage": {"dots_serve_kv_cache_usage_ratio"},
    "Time to first token": {"dots_serve_time_to_first_token_seconds_bucket"},
    "Inter-token latency": {"dots_serve_inter_token_latency_seconds_bucket"},
    "End-to-end latency": {"dots_serve_e2e_request_latency_seconds_bucket"},
    "Queue time": {"dots_serve_request_queue_time_seconds_bucket"},
    "Prompt and generation tokens/s": {"dots_serve_prompt_tokens_total", "dots_serve_generation_tokens_total"},
    "Prefix cache hit rate": {"dots_serve_prefix_cache_hits_total", "dots_serve_prefix_cache_queries_total"},
    "Preemptions": {"dots_serve_preemptions_total"},
    "Tokens per step": {"dots_serve_iteration_tokens_sum", "dots_serve_iteration_tokens_count"},
    "Step duration": {"dots_serve_step_duration_seconds_bucket"},
    "Expert load (layer x expert)": {"dots_serve_moe_expert_tokens_total"},
    "Expert load imbalance per layer": {"dots_serve_moe_expert_tokens_total"},
}


def panel_metrics(panel: dict) -> set[str]:
    return set().union(*(metric_names_in(target["expr"]) for target in panel["targets"]))


def test_dashboard_has_the_model_name_and_datasource_variables():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "dots-serve"
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model_name = variables["model_name"]
    assert model_name["type"] == "query"
    assert model_name["datasource"] == DATASOURCE
    assert model_name["query"]["query"] == "label_values(dots_serve_info, model_name)"


def test_every_panel_has_a_datasource_and_queries_filtered_by_model():
    panels = query_panels(load_dashboard())
    assert len(panels) >= len(REQUIRED_PANELS)
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"] == DATASOURCE, title
        assert panel["targets"], title
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"]), title
        assert panel.get("description"), title
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, title
            assert target["expr"].strip(), title
            assert 'model_name=~"$model_name"' in target["expr"], title


def test_required_panels_read_the_right_metrics():
    panels = {panel["title"]: panel for panel in query_panels(load_dashboard())}
    for title, metrics in REQUIRED_PANELS.items():
        assert title in panels, f"missing panel {title!r}"
        assert metrics <= panel_metrics(panels[title]), title
    heatmap = panels["Expert load (layer x expert)"]
    assert heatmap["type"] == "heatmap"
    assert "sum by (layer, expert)" in heatmap["targets"][0]["expr"]
    imbalance = panels["Expert load imbalance per layer"]["targets"][0]["expr"]
    assert imbalance.startswith("max by (layer)") and "avg by (layer)" in imbalance
    latency_panels = ["Time to first token", "Inter-token latency", "End-to-end latency"]
    for title in latency_panels:
        assert [target["legendFormat"] for target in panels[title]["targets"]] == ["p50", "p95", "p99"], title


def test_every_metric_in_the_dashboard_is_exported_and_every_exported_metric_is_shown():
    # The vllm:* series are aliases of dots_serve_* ones for routers (server/vllm_metrics.py): shown once, natively.
    exported = {name for name in exported_sample_names(populated_metrics()) if not name.startswith("vllm:")}
    used = set().union(*(panel_metrics(panel) for panel in query_panels(load_dashboard())))
    assert used <= exported, f"dashboard reads metrics the server does not export: {sorted(used - exported)}"
    exported_families = {name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for name in exported}
    used_families = {name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for name in used}
    assert exported_families - used_families == {"dots_serve_ready"}


def test_every_query_is_valid_promql(tmp_path):
    """promtool parses each query (variables substituted as Grafana does) as a recording rule."""
    rules = []
    for panel in query_panels(load_dashboard()):
        for target in panel["targets"]:
            expr = substitute_variables(target["expr"], model_name=".*", rate_interval="1m", time_range="1h")
            rules.append({"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr})
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [require_tool("promtool"), "check", "rules", "queries.yml"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_panels_sit_on_the_grid_without_overlapping():
    cells: dict[tuple[int, int], str] = {}
    for panel in load_dashboard()["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_provisioning_points_grafana_at_the_dashboard_and_prometheus():
    provisioning = DEPLOY / "grafana" / "provisioning"
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    variables = {variable["name"]: variable for variable in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == datasource["uid"]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "dots-serve.yml").read_text())["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert DASHBOARD.parent.name == "dashboards"
