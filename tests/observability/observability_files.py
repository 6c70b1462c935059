"""Shared by the observability tests: the shipped files, the dashboard's queries, metric names in PromQL."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from scheduler.stats import RequestStats, StepStats
from server.metrics import ServerMetrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dots-serve.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
INFO = {
    "version": "0.1.0", "model": "dots1-tiny", "dtype": "float32", "device": "cpu", "tensor_parallel_size": "1",
    "block_size": "16", "num_kv_blocks": "64",
}

# Metrics that Prometheus itself attaches to every target, not exported by the server.
PROMETHEUS_SYNTHETIC_METRICS = {"up"}

_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan",
}


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run `make system-deps` (scripts/install-system-deps.sh) to install Prometheus")
    return path


def promtool_complaints(body: bytes) -> list[str]:
    """What ``promtool check metrics`` says of an exposition, less the one lint allowed: vLLM's names, which routers
    read, use the colon Prometheus reserves for recording rules."""
    result = subprocess.run([require_tool("promtool"), "check", "metrics"], input=body, capture_output=True,
                            timeout=60)
    lines = (result.stdout.decode() + result.stderr.decode()).splitlines()
    return [line for line in lines
            if not (line.startswith("vllm:") and line.endswith("metric names should not contain ':'"))]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def query_panels(dashboard: dict) -> list[dict]:
    """Every panel that shows data (rows are only headings), nested rows included."""
    panels = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def substitute_variables(expr: str, model_name: str, rate_interval: str, time_range: str) -> str:
    """What Grafana sends to Prometheus for this expression."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$__range", time_range)
        .replace("$model_name", model_name)
    )


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords or label names."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end():].lstrip()
        if following.startswith("(") or match.group().lower() in _PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def populated_metrics() -> ServerMetrics:
    """A ServerMetrics that has seen one of every event, so that every series it can export exists."""
    metrics = ServerMetrics("dots1-tiny", INFO)
    metrics.set_ready(True)
    metrics.on_step(StepStats(0.01, 1, 4, 0, 1, 0, 0.25, 4, 0, 0))
    metrics.on_request_finished(RequestStats("r", 1.0, 4, 2, 1.1, 1.2, [1.2, 1.3], 1.3, "stop"))
    metrics.on_expert_counts([1], torch.tensor([[1, 1]]))
    metrics.observe_http("/v1/completions", "POST", 200)
    metrics.record_rejected("invalid_request")
    return metrics


def exported_sample_names(metrics: ServerMetrics) -> set[str]:
    body, _ = metrics.render()
    return {
        sample.name for family in text_string_to_metric_families(body.decode()) for sample in family.samples
    }
