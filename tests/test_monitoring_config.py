"""The monitoring configuration in infra/monitoring, checked by the real Prometheus tools."""

import json
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from rtdlm.metrics import PrometheusTrainingCallback, start_server

MONITORING = Path("infra/monitoring")
PROMETHEUS = MONITORING / "prometheus"


def run(*command: str, cwd: Path | None = None) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_every_alert_has_promtool_tests_that_pass(tool: Callable[[str], str]) -> None:
    assert "SUCCESS" in run(tool("promtool"), "check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert "SUCCESS" in run(tool("promtool"), "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    assert alerts == fired, "every alert needs a case where it fires"
    # each test also feeds a healthy series that must stay silent: promtool compares the full
    # set of firing alerts, so a healthy run firing would fail the test above
    assert all(len(test["input_series"]) >= 2 for test in tests)


def test_thresholds_are_tunable_in_one_place() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    thresholds = {r["record"] for r in rules["groups"][0]["rules"]}
    expressions = " ".join(r["expr"] for r in rules["groups"][1]["rules"])
    assert all(name.startswith("rtdlm:threshold:") for name in thresholds)
    assert all(name in expressions for name in thresholds)


def test_prometheus_configs_are_valid(tool: Callable[[str], str], tmp_path: Path) -> None:
    run(tool("promtool"), "check", "config", "prometheus-compose.yml", cwd=PROMETHEUS)
    # Debian builds Prometheus without Kubernetes discovery, so promtool here rejects the
    # kubernetes_sd_configs key itself; everything else (relabelling regexes, rule files,
    # alerting) is checked with file discovery standing in for it.
    config = (PROMETHEUS / "prometheus-kubernetes.yml").read_text()
    assert "kubernetes_sd_configs:\n      - role: pod" in config
    (tmp_path / "alerts.yml").write_text((PROMETHEUS / "alerts.yml").read_text())
    (tmp_path / "prometheus.yml").write_text(
        config.replace("kubernetes_sd_configs:", "file_sd_configs:").replace(
            "- role: pod", "- files: [pods.json]"
        )
    )
    run(tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml"))


def test_alertmanager_config_is_valid(tool: Callable[[str], str]) -> None:
    output = run(tool("amtool"), "check-config", str(MONITORING / "alertmanager/alertmanager.yml"))
    assert "SUCCESS" in output


def test_a_real_scrape_passes_promtool_check_metrics(tool: Callable[[str], str]) -> None:
    registry = CollectorRegistry()
    callback = PrometheusTrainingCallback(registry, run="lint", peak_flops_per_second=1e12)
    callback.on_step(
        1,
        loss=2.0,
        learning_rate=1e-3,
        tokens=512,
        step_seconds=0.1,
        grad_norm=1.0,
        data_wait_seconds=0.001,
        mfu=0.01,
        peak_flops=1e12,
    )
    callback.on_eval(1, loss=2.1)
    callback.on_checkpoint(1, save_seconds=0.2)
    server = start_server(registry, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(server.url, timeout=10) as response:
            scraped = response.read()
    finally:
        server.close()
    done = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=scraped, capture_output=True, timeout=60
    )
    assert done.returncode == 0 and not done.stdout and not done.stderr, done.stdout + done.stderr
    for name in [
        "rtdlm_training_loss",
        "rtdlm_training_perplexity",
        "rtdlm_training_learning_rate",
        "rtdlm_batch_time_seconds_bucket",
        "rtdlm_tokens_per_second",
        "rtdlm_gradient_norm",
        "rtdlm_host_memory_used_bytes",
        "rtdlm_training_steps_total",
        "rtdlm_tokens_total",
        "rtdlm_nonfinite_steps_total",
        "rtdlm_eval_loss",
        "rtdlm_model_flops_utilization",
        "rtdlm_checkpoint_last_success_timestamp_seconds",
        "rtdlm_checkpoint_save_seconds_count",
        "rtdlm_data_wait_seconds_count",
    ]:
        assert f"\n{name}{{".encode() in scraped, name


def test_grafana_provisioning_points_at_the_dashboard_datasource() -> None:
    datasource = yaml.safe_load(
        (MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    provider = yaml.safe_load(
        (MONITORING / "grafana/provisioning/dashboards/rtdlm.yml").read_text()
    )["providers"][0]
    dashboard = json.loads((MONITORING / "grafana/dashboards/rtdlm-training.json").read_text())
    assert provider["type"] == "file" and provider["options"]["path"]
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Loss", "Perplexity", "Learning rate", "Model FLOPs utilization"} <= titles
    assert {"Step time p50 / p95", "Gradient norm", "Memory", "Checkpoint age"} <= titles
    assert {"Non-finite steps", "Tokens per second (all processes)"} <= titles
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])
