import logging
import math

import jax
import pytest
from prometheus_client import CollectorRegistry

from rtdlm.metrics import PrometheusTrainingCallback

LABELS = {"run": "r1", "process_index": "3"}


def value(registry: CollectorRegistry, name: str, **extra: str) -> float | None:
    return registry.get_sample_value(name, {**LABELS, **extra})


def callback(registry: CollectorRegistry, **kwargs: object) -> PrometheusTrainingCallback:
    return PrometheusTrainingCallback(registry, run="r1", process_index=3, **kwargs)  # type: ignore[arg-type]


def test_a_step_reads_back_under_the_seed_names_with_run_and_process_labels() -> None:
    registry = CollectorRegistry()
    cb = callback(registry, peak_flops_per_second=1e12)
    assert value(registry, "rtdlm_peak_flops_per_second") == 1e12  # before the first step
    cb.on_step(
        1,
        loss=2.0,
        learning_rate=1e-3,
        tokens=4096,
        step_seconds=0.5,
        grad_norm=1.25,
        data_wait_seconds=0.002,
        mfu=0.4,
        peak_flops=2e12,
    )
    cb.on_step(2, loss=1.5, learning_rate=2e-3, tokens=4096, step_seconds=90.0, grad_norm=0.5)
    assert value(registry, "rtdlm_training_loss") == 1.5
    assert value(registry, "rtdlm_training_perplexity") == pytest.approx(math.exp(1.5))
    assert value(registry, "rtdlm_training_learning_rate") == 2e-3
    assert value(registry, "rtdlm_tokens_per_second") == pytest.approx(4096 / 90.0)
    assert value(registry, "rtdlm_gradient_norm") == 0.5
    assert value(registry, "rtdlm_training_steps_total") == 2
    assert value(registry, "rtdlm_tokens_total") == 8192
    assert value(registry, "rtdlm_training_step") == 2
    assert value(registry, "rtdlm_model_flops_utilization") == 0.4  # the last step that had one
    assert value(registry, "rtdlm_peak_flops_per_second") == 2e12
    assert value(registry, "rtdlm_batch_time_seconds_count") == 2
    # a 90 s step lands in a real bucket, not only in +Inf
    assert value(registry, "rtdlm_batch_time_seconds_bucket", le="120.0") == 2
    assert value(registry, "rtdlm_batch_time_seconds_bucket", le="60.0") == 1
    assert value(registry, "rtdlm_data_wait_seconds_count") == 1
    assert value(registry, "rtdlm_nonfinite_steps_total") == 0


def test_nonfinite_loss_or_gradients_are_counted() -> None:
    registry = CollectorRegistry()
    cb = callback(registry)
    cb.on_step(1, loss=math.nan, learning_rate=1e-3, tokens=10, step_seconds=1.0)
    cb.on_step(2, loss=1.0, learning_rate=1e-3, tokens=10, step_seconds=1.0, grad_norm=math.inf)
    cb.on_step(3, loss=1.0, learning_rate=1e-3, tokens=10, step_seconds=1.0, grad_norm=1.0)
    assert value(registry, "rtdlm_nonfinite_steps_total") == 2
    cb.on_step(4, loss=1e6, learning_rate=1e-3, tokens=10, step_seconds=1.0)
    perplexity = value(registry, "rtdlm_training_perplexity")
    assert perplexity is not None and math.isfinite(perplexity)  # exp would overflow


def test_eval_and_checkpoint() -> None:
    registry = CollectorRegistry()
    cb = callback(registry)
    started = value(registry, "rtdlm_checkpoint_last_success_timestamp_seconds")
    assert started is not None and started > 1.7e9  # counts from process start
    cb.on_eval(10, loss=2.25)
    cb.on_checkpoint(10, save_seconds=0.3)
    assert value(registry, "rtdlm_eval_loss") == 2.25
    assert value(registry, "rtdlm_checkpoint_save_seconds_count") == 1
    saved = value(registry, "rtdlm_checkpoint_last_success_timestamp_seconds")
    assert saved is not None and saved >= started
    assert value(registry, "rtdlm_checkpoint_errors_total") == 0
    cb.on_checkpoint_error(20)  # a failed save counts, and is not a success
    assert value(registry, "rtdlm_checkpoint_errors_total") == 1
    assert value(registry, "rtdlm_checkpoint_last_success_timestamp_seconds") == saved


def test_cpu_exports_host_memory_and_no_fake_gpu_numbers() -> None:
    registry = CollectorRegistry()
    cb = callback(registry, devices=jax.local_devices())
    cb.on_step(1, loss=1.0, learning_rate=1e-3, tokens=1, step_seconds=1.0)
    host = value(registry, "rtdlm_host_memory_used_bytes")
    assert host is not None and host > 10e6
    assert value(registry, "rtdlm_gpu_memory_used_bytes", device="0") is None


class FakeGpu:
    """An accelerator's memory statistics: the one boundary that cannot exist on this machine."""

    platform = "gpu"
    id = 0

    def memory_stats(self) -> dict:
        return {"bytes_in_use": 3 * 2**30, "bytes_limit": 80 * 2**30}


def test_gpu_memory_comes_from_the_device_statistics() -> None:
    registry = CollectorRegistry()
    cb = callback(registry, devices=[FakeGpu()])
    cb.on_step(1, loss=1.0, learning_rate=1e-3, tokens=1, step_seconds=1.0)
    assert value(registry, "rtdlm_gpu_memory_used_bytes", device="0") == 3 * 2**30
    assert value(registry, "rtdlm_gpu_memory_limit_bytes", device="0") == 80 * 2**30


def test_a_failing_metric_never_crashes_training(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    cb = callback(registry, devices=[object()])  # no platform: reading memory fails
    with caplog.at_level(logging.ERROR):
        for step in range(5):
            cb.on_step(step, loss=1.0, learning_rate=1e-3, tokens=1, step_seconds=1.0)
    assert cb.errors == 5
    assert caplog.text.count("training continues") == 3  # logged, then quiet
    assert value(registry, "rtdlm_training_steps_total") == 5
