"""The shipped Prometheus configuration and alert rules, checked and unit-tested by promtool."""
import subprocess
from pathlib import Path

import yaml
from observability_files import (
    ALERTS,
    DEPLOY,
    PROMETHEUS_SYNTHETIC_METRICS,
    alert_rules,
    exported_sample_names,
    metric_names_in,
    populated_metrics,
    require_tool,
)

PROMETHEUS_DIR = DEPLOY / "prometheus"
EXPECTED_ALERTS = {
    "DotsServeDown", "DotsServeEngineNotReady", "DotsServeRequestsWaitingTooLong", "DotsServeKVCacheNearFull",
    "DotsServePreemptionsRising", "DotsServeTimeToFirstTokenHigh", "DotsServeErrorRateHigh", "DotsServeEngineErrors",
}


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_prometheus_config_is_valid_and_loads_the_rules():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    [job] = config["scrape_configs"]
    assert job["job_name"] == "dots-serve"
    assert job["static_configs"][0]["targets"] == ["dots-serve:8000"]


def test_alert_rules_are_valid():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


def test_alert_rules_cover_the_operational_failures():
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == EXPECTED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_alert_rules_use_only_metrics_the_server_exports():
    exported = exported_sample_names(populated_metrics()) | PROMETHEUS_SYNTHETIC_METRICS
    for rule in alert_rules():
        used = metric_names_in(rule["expr"])
        assert used, rule["alert"]
        assert used <= exported, f"{rule['alert']} uses {sorted(used - exported)}"


def test_alert_unit_tests_pass():
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_unit_test():
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    fired = {
        case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")
    }
    assert fired == EXPECTED_ALERTS


def test_promtool_rejects_a_broken_rule(tmp_path):
    broken = {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "rate(dots_serve_preemptions_total[5m]"}]}]}
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    result = promtool("check", "rules", "broken.yml", cwd=tmp_path)
    assert result.returncode != 0
