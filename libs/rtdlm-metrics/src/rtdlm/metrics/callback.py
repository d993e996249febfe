"""What the trainer reports each step, eval and checkpoint, under the names operators alert on.

Every series carries `run` and `process_index` labels, so a multi-host job is scraped per host
and runs are told apart. Reporting never raises: a metrics failure is logged and training
goes on.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rtdlm.metrics.memory import device_memory, host_memory_used_bytes

log = logging.getLogger(__name__)

# Steps take from milliseconds (tiny on a GPU) to minutes (large, many micro-batches).
BATCH_TIME_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
DATA_WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
CHECKPOINT_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
LABELS = ("run", "process_index")

F = TypeVar("F", bound=Callable[..., None])


def _never_raises(method: F) -> F:
    @functools.wraps(method)
    def guarded(self: PrometheusTrainingCallback, *args: Any, **kwargs: Any) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception:
            self.errors += 1
            if self.errors <= 3:  # say it, but don't flood the training log
                log.exception("metrics: %s failed; training continues", method.__name__)

    return guarded  # type: ignore[return-value]


class PrometheusTrainingCallback:
    """Holds the metric children for one process; a class because counters accumulate."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        run: str,
        process_index: int = 0,
        peak_flops_per_second: float | None = None,
        devices: list[jax.Device] | None = None,
    ) -> None:
        self.errors = 0
        self._devices = devices if devices is not None else jax.local_devices()
        labels = {"run": run, "process_index": str(process_index)}

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, [*LABELS, *extra], registry=registry)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, LABELS, registry=registry).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=registry).labels(**labels)

        self._labels = labels
        self.loss = gauge("rtdlm_training_loss", "Training loss of the last step.").labels(**labels)
        self.perplexity = gauge(
            "rtdlm_training_perplexity", "exp(training loss) of the last step."
        ).labels(**labels)
        self.learning_rate = gauge(
            "rtdlm_training_learning_rate", "Learning rate of the last step."
        ).labels(**labels)
        self.tokens_per_second = gauge(
            "rtdlm_tokens_per_second", "Training tokens per second of the last step."
        ).labels(**labels)
        self.gradient_norm = gauge(
            "rtdlm_gradient_norm", "Global L2 norm of the last step's gradients."
        ).labels(**labels)
        self.eval_loss = gauge("rtdlm_eval_loss", "Held-out loss of the last evaluation.").labels(
            **labels
        )
        self.mfu = gauge(
            "rtdlm_model_flops_utilization",
            "Model FLOP/s of the last step over the peak FLOP/s (0..1).",
        ).labels(**labels)
        self.peak_flops = gauge(
            "rtdlm_peak_flops_per_second", "The peak FLOP/s that MFU is measured against."
        ).labels(**labels)
        self.step = gauge("rtdlm_training_step", "Step number of the last step.").labels(**labels)
        self.last_step_time = gauge(
            "rtdlm_training_last_step_timestamp_seconds", "Unix time the last step finished."
        ).labels(**labels)
        self.checkpoint_time = gauge(
            "rtdlm_checkpoint_last_success_timestamp_seconds",
            "Unix time of the last successful checkpoint save (process start before the first).",
        ).labels(**labels)
        self.gpu_memory = gauge(
            "rtdlm_gpu_memory_used_bytes", "Accelerator memory in use.", ("device",)
        )
        self.gpu_memory_limit = gauge(
            "rtdlm_gpu_memory_limit_bytes", "Accelerator memory available to JAX.", ("device",)
        )
        self.host_memory = gauge(
            "rtdlm_host_memory_used_bytes", "Resident host memory of the training process."
        ).labels(**labels)
        self.steps = counter("rtdlm_training_steps", "Training steps taken.")
        self.tokens = counter("rtdlm_tokens", "Training tokens consumed.")
        self.nonfinite_steps = counter(
            "rtdlm_nonfinite_steps", "Steps whose loss or gradients were NaN or infinite."
        )
        self.checkpoint_errors = counter(
            "rtdlm_checkpoint_errors", "Checkpoint saves that failed (disk full, I/O errors)."
        )
        self.batch_time = histogram(
            "rtdlm_batch_time_seconds", "Wall time of one training step.", BATCH_TIME_BUCKETS
        )
        self.data_wait = histogram(
            "rtdlm_data_wait_seconds", "Time a step waited for its batch.", DATA_WAIT_BUCKETS
        )
        self.checkpoint_save = histogram(
            "rtdlm_checkpoint_save_seconds",
            "Time a checkpoint save blocked training.",
            CHECKPOINT_BUCKETS,
        )
        if peak_flops_per_second is not None:
            self.peak_flops.set(peak_flops_per_second)
        self.checkpoint_time.set(time.time())  # "checkpoint too old" counts from the start
        self.last_step_time.set(time.time())

    @_never_raises
    def on_step(
        self,
        step: int,
        *,
        loss: float,
        learning_rate: float,
        tokens: int,
        step_seconds: float,
        grad_norm: float | None = None,
        data_wait_seconds: float | None = None,
        mfu: float | None = None,
        peak_flops: float | None = None,
    ) -> None:
        """`mfu` and the `peak_flops` it is against come from rtdlm.metrics.mfu.utilization,
        which raises the peak when a step beats it."""
        self.step.set(step)
        self.steps.inc()
        self.tokens.inc(tokens)
        self.loss.set(loss)
        self.perplexity.set(math.exp(min(loss, 700.0)) if math.isfinite(loss) else math.nan)
        self.learning_rate.set(learning_rate)
        self.batch_time.observe(step_seconds)
        if step_seconds > 0:
            self.tokens_per_second.set(tokens / step_seconds)
        finite = math.isfinite(loss)
        if grad_norm is not None:
            self.gradient_norm.set(grad_norm)
            finite = finite and math.isfinite(grad_norm)
        if not finite:
            self.nonfinite_steps.inc()
        if data_wait_seconds is not None:
            self.data_wait.observe(data_wait_seconds)
        if mfu is not None:
            self.mfu.set(mfu)
        if peak_flops is not None:
            self.peak_flops.set(peak_flops)
        self.last_step_time.set(time.time())
        self.sample_memory()

    @_never_raises
    def on_eval(self, step: int, *, loss: float) -> None:
        self.eval_loss.set(loss)

    @_never_raises
    def on_checkpoint(self, step: int, *, save_seconds: float) -> None:
        """Once a checkpoint is known to be committed; `save_seconds`: time it blocked training."""
        self.checkpoint_save.observe(save_seconds)
        self.checkpoint_time.set(time.time())

    @_never_raises
    def on_checkpoint_error(self, step: int) -> None:
        """A save of `step` failed; the last-success timestamp stays where it was."""
        self.checkpoint_errors.inc()

    @_never_raises
    def sample_memory(self) -> None:
        self.host_memory.set(host_memory_used_bytes())
        for device in self._devices:
            reading = device_memory(device)
            if reading is None:
                continue
            used, limit = reading
            self.gpu_memory.labels(**self._labels, device=str(device.id)).set(used)
            if limit is not None:
                self.gpu_memory_limit.labels(**self._labels, device=str(device.id)).set(limit)
