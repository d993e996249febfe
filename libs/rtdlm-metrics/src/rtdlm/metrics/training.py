"""Training metrics under the names operators already alert on (rtdlm_*)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, Histogram

# Steps take from milliseconds (tiny on a GPU) to minutes (large, many micro-batches).
BATCH_TIME_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class TrainingMetrics:
    loss: Gauge
    perplexity: Gauge
    learning_rate: Gauge
    tokens_per_second: Gauge
    batch_time: Histogram


def training_metrics(registry: CollectorRegistry) -> TrainingMetrics:
    """Registers the training metrics in `registry` (one registry per process)."""
    return TrainingMetrics(
        loss=Gauge("rtdlm_training_loss", "Training loss of the last step.", registry=registry),
        perplexity=Gauge(
            "rtdlm_training_perplexity", "exp(training loss) of the last step.", registry=registry
        ),
        learning_rate=Gauge(
            "rtdlm_training_learning_rate", "Learning rate of the last step.", registry=registry
        ),
        tokens_per_second=Gauge(
            "rtdlm_tokens_per_second", "Training throughput of the last step.", registry=registry
        ),
        batch_time=Histogram(
            "rtdlm_batch_time_seconds",
            "Wall time of one training step.",
            buckets=BATCH_TIME_BUCKETS,
            registry=registry,
        ),
    )


def record_step(
    metrics: TrainingMetrics,
    loss: float,
    learning_rate: float,
    tokens_per_second: float,
    step_seconds: float,
) -> None:
    metrics.loss.set(loss)
    metrics.perplexity.set(math.exp(min(loss, 700.0)))  # exp overflows a float past ~709
    metrics.learning_rate.set(learning_rate)
    metrics.tokens_per_second.set(tokens_per_second)
    metrics.batch_time.observe(step_seconds)
