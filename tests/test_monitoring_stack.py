"""A real training loop, a real Prometheus scraping it, a real Alertmanager receiving its alerts.

Only addresses and intervals are changed from infra/monitoring's files: the compose scrape
config points at the exporter on 127.0.0.1, scraping and rule evaluation run every second,
and Alertmanager's receivers post to a webhook served by this test.
"""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from conftest import free_ports
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from rtdlm.data import BYTE_VOCAB_SIZE
from rtdlm.data.corpus import split_documents, stdlib_documents
from rtdlm.metrics import Peak, PrometheusTrainingCallback, start_server
from rtdlm.train import (
    Callback,
    CheckpointLog,
    EvalLog,
    Prometheus,
    RunResult,
    StepLog,
    Trainer,
    resolve,
)

MONITORING = Path("infra/monitoring")
pytestmark = pytest.mark.slow
PEAK_FLOPS = 1e11  # any value: MFU is against the higher of this and the fastest step so far


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        families = text_string_to_metric_families(response.read().decode())
        return {s.name: s.value for f in families for s in f.samples if not s.labels.get("le")}


@pytest.fixture
def training(
    tmp_path: Path,
) -> Iterator[tuple[PrometheusTrainingCallback, str, Callable[..., RunResult]]]:
    registry = CollectorRegistry()
    callback = PrometheusTrainingCallback(registry, run="stack", peak_flops_per_second=PEAK_FLOPS)
    server = start_server(registry, "127.0.0.1", 0)
    cfg = resolve(
        "tiny",
        sets=[
            *["model.seq_len=32", "model.num_layers=1", "data.batch_size=2"],
            *["train.max_steps=40", "train.eval_every=10", "optimizer.warmup_steps=5"],
            "train.checkpoint_every=20",
        ],
        vocab_size=BYTE_VOCAB_SIZE,
    )
    data = split_documents(stdlib_documents())

    def run_training(*more: Callback) -> RunResult:
        """The real Trainer, reporting through the Prometheus callback as the trainer app does;
        `more` callbacks hear each event after the metrics were updated."""
        callbacks = [Prometheus(callback), *more]
        peak = Peak(PEAK_FLOPS, "config")
        trainer = Trainer(cfg, data, tmp_path / "run", callbacks, compile_cache=False, peak=peak)
        return trainer.run()

    try:
        yield callback, server.url, run_training
    finally:
        server.close()


def test_scraped_values_agree_with_what_the_trainer_reported(training: Any) -> None:
    _, url, run_training = training

    class Scrape(Callback):
        """Scrapes over HTTP, mid-run, right after each event reached the metrics."""

        steps = 0
        peak = PEAK_FLOPS  # the fastest step so far raises it: MFU is never above 1
        checkpoints: ClassVar[list[int]] = []

        def on_step(self, log: StepLog) -> None:
            samples = scrape(url)
            Scrape.steps += 1
            assert samples["rtdlm_training_loss"] == pytest.approx(log.loss)
            assert samples["rtdlm_training_perplexity"] == pytest.approx(math.exp(log.loss))
            assert samples["rtdlm_training_learning_rate"] == pytest.approx(log.learning_rate)
            assert samples["rtdlm_gradient_norm"] == pytest.approx(log.grad_norm)
            assert samples["rtdlm_tokens_per_second"] == pytest.approx(log.tokens_per_second)
            assert samples["rtdlm_training_steps_total"] == Scrape.steps
            assert samples["rtdlm_training_step"] == log.step
            assert samples["rtdlm_batch_time_seconds_count"] == Scrape.steps
            assert samples["rtdlm_data_wait_seconds_count"] == Scrape.steps
            achieved = log.flops / log.step_seconds
            Scrape.peak = max(Scrape.peak, achieved)
            assert samples["rtdlm_peak_flops_per_second"] == pytest.approx(Scrape.peak)
            mfu = samples["rtdlm_model_flops_utilization"]
            assert mfu == pytest.approx(achieved / Scrape.peak) and 0 < mfu <= 1

        def on_eval(self, log: EvalLog) -> None:
            assert scrape(url)["rtdlm_eval_loss"] == pytest.approx(log.loss)

        def on_checkpoint_committed(self, log: CheckpointLog) -> None:
            Scrape.checkpoints.append(log.step)
            samples = scrape(url)
            assert samples["rtdlm_checkpoint_save_seconds_count"] == len(Scrape.checkpoints)
            assert samples["rtdlm_checkpoint_errors_total"] == 0

    result = run_training(Scrape())
    assert result.status == "completed" and Scrape.steps == 40
    assert Scrape.checkpoints == [20, 40]


class Webhook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self) -> None:  # (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Webhook.received.append({"path": self.path, **json.loads(body)})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def start(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_prometheus_scrapes_dashboard_queries_answer_and_alerts_reach_alertmanager(
    training: Any, tool: Callable[[str], str], tmp_path: Path
) -> None:
    callback, url, run_training = training
    exporter = urllib.parse.urlparse(url).netloc
    prom_port, am_port = free_ports(2)
    webhook = ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=webhook.serve_forever, daemon=True).start()

    am_config = yaml.safe_load((MONITORING / "alertmanager/alertmanager.yml").read_text())
    am_config["route"]["group_wait"] = "1s"
    for receiver in am_config["receivers"]:
        for hook in receiver["webhook_configs"]:
            path = urllib.parse.urlparse(hook["url"]).path
            hook["url"] = f"http://127.0.0.1:{webhook.server_address[1]}{path}"
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(am_config))

    prom_config = yaml.safe_load((MONITORING / "prometheus/prometheus-compose.yml").read_text())
    prom_config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    prom_config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [
        f"127.0.0.1:{am_port}"
    ]
    prom_config["scrape_configs"][0]["static_configs"][0]["targets"] = [exporter]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_config))
    (tmp_path / "alerts.yml").write_text((MONITORING / "prometheus/alerts.yml").read_text())

    alertmanager = start(
        [
            tool("prometheus-alertmanager"),
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{am_port}",
            "--cluster.listen-address=",
        ],
        tmp_path / "alertmanager.log",
    )
    prometheus = start(
        [
            tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        tmp_path / "prometheus.log",
    )
    api = f"http://127.0.0.1:{prom_port}/api/v1"

    def query(expr: str) -> list:
        return get_json(f"{api}/query?{urllib.parse.urlencode({'query': expr})}")["data"]["result"]

    try:
        wait_for("Prometheus", lambda: get_json(f"{api}/status/buildinfo"))
        # Prometheus sends a firing alert once, then again only after a minute: Alertmanager
        # must be listening before anything fires.
        wait_for("Alertmanager", lambda: get_json(f"http://127.0.0.1:{am_port}/api/v2/status"))
        wait_for("the exporter to be up", lambda: [r for r in query("up") if r["value"][1] == "1"])

        class Slow(Callback):
            def on_step(self, log: StepLog) -> None:
                time.sleep(0.05)  # train while Prometheus scrapes every second

        assert run_training(Slow()).ok
        wait_for("a few scrapes", lambda: query("count_over_time(rtdlm_training_loss[1m]) >= 5"))

        dashboard = json.loads((MONITORING / "grafana/dashboards/rtdlm-training.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$run", ".+").replace("$__rate_interval", "10s")
                if "rtdlm_gpu_" in expr:  # no accelerator here: CPU exports host memory instead
                    assert query(expr) == []
                    continue
                assert query(expr), f"panel {panel['title']!r}: no data for {expr}"
        assert query("rtdlm:threshold:checkpoint_age_seconds")  # the thresholds are evaluated

        # a NaN step: RtdlmNonFiniteLoss has no `for`, so it fires at the next evaluation
        callback.on_step(41, loss=math.nan, learning_rate=1e-4, tokens=64, step_seconds=0.1)
        wait_for(
            "the alert in Prometheus",
            lambda: query('ALERTS{alertname="RtdlmNonFiniteLoss", alertstate="firing"}'),
        )
        alerts = wait_for(
            "the alert in Alertmanager",
            lambda: [
                a
                for a in get_json(f"http://127.0.0.1:{am_port}/api/v2/alerts")
                if a["labels"]["alertname"] == "RtdlmNonFiniteLoss"
            ],
        )
        assert (
            alerts[0]["labels"]["run"] == "stack" and alerts[0]["labels"]["severity"] == "critical"
        )
        delivered = wait_for(
            "the webhook notification",
            lambda: [n for n in Webhook.received if n["path"] == "/oncall"],  # critical route
        )
        assert delivered[0]["alerts"][0]["labels"]["alertname"] == "RtdlmNonFiniteLoss"
    finally:
        for process in (prometheus, alertmanager):
            process.terminate()
            process.wait(timeout=30)
        webhook.shutdown()
