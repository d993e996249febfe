import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rtdlm.metrics import record_step, training_metrics


def test_recorded_step_reads_back_under_the_seed_names() -> None:
    registry = CollectorRegistry()
    metrics = training_metrics(registry)
    record_step(metrics, loss=2.0, learning_rate=1e-3, tokens_per_second=500.0, step_seconds=0.2)
    record_step(metrics, loss=1.5, learning_rate=2e-3, tokens_per_second=800.0, step_seconds=90.0)
    assert registry.get_sample_value("rtdlm_training_loss") == 1.5
    assert registry.get_sample_value("rtdlm_training_perplexity") == pytest.approx(math.exp(1.5))
    assert registry.get_sample_value("rtdlm_training_learning_rate") == 2e-3
    assert registry.get_sample_value("rtdlm_tokens_per_second") == 800.0
    assert registry.get_sample_value("rtdlm_batch_time_seconds_count") == 2
    # A 90 s step lands in a real bucket, not only in +Inf.
    assert registry.get_sample_value("rtdlm_batch_time_seconds_bucket", {"le": "120.0"}) == 2
    assert registry.get_sample_value("rtdlm_batch_time_seconds_bucket", {"le": "60.0"}) == 1
    names = {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert {"rtdlm_training_loss", "rtdlm_batch_time_seconds"} <= names


def test_huge_loss_does_not_overflow_perplexity() -> None:
    registry = CollectorRegistry()
    record_step(
        training_metrics(registry), loss=1e6, learning_rate=0.0, tokens_per_second=1, step_seconds=1
    )
    perplexity = registry.get_sample_value("rtdlm_training_perplexity")
    assert perplexity is not None and math.isfinite(perplexity)
