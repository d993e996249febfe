import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from rtdlm.metrics import ExporterError, PrometheusTrainingCallback, start_server


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        f"{sample.name}{sorted(sample.labels.items())}": sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_served_over_http_and_stopped_cleanly() -> None:
    registry = CollectorRegistry()
    cb = PrometheusTrainingCallback(registry, run="http", process_index=0)
    server = start_server(registry, host="127.0.0.1", port=0)
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
        cb.on_step(7, loss=3.5, learning_rate=1e-4, tokens=100, step_seconds=0.25)
        samples = scrape(server.url)
        assert samples["rtdlm_training_loss[('process_index', '0'), ('run', 'http')]"] == 3.5
        assert samples["rtdlm_training_steps_total[('process_index', '0'), ('run', 'http')]"] == 1
    finally:
        server.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)
    # the port is free again
    start_server(registry, host="127.0.0.1", port=server.port).close()


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ExporterError, match=rf"127.0.0.1:{port}: the port is already in use"):
            start_server(CollectorRegistry(), host="127.0.0.1", port=port)


@pytest.mark.parametrize(
    ("host", "port", "message"),
    [
        ("no-such-host.invalid", 0, "unknown host 'no-such-host.invalid'"),
        ("10.255.255.1", 0, "is not an address of this machine"),
        ("127.0.0.1", 70000, "out of range"),
    ],
)
def test_bad_host_or_port_is_a_clear_error(host: str, port: int, message: str) -> None:
    with pytest.raises(ExporterError, match=message) as error:
        start_server(CollectorRegistry(), host=host, port=port)
    assert "\n" not in str(error.value)
