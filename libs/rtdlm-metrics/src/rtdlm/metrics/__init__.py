"""rtdlm.metrics: the Prometheus exporter, the training callback, and MFU."""

from rtdlm.metrics.callback import BATCH_TIME_BUCKETS, PrometheusTrainingCallback
from rtdlm.metrics.exporter import ExporterError, MetricsServer, start_server
from rtdlm.metrics.memory import device_memory, host_memory_used_bytes
from rtdlm.metrics.mfu import (
    Peak,
    best_seconds,
    measure_matmul_flops,
    measure_peak,
    peak_flops,
    utilization,
)

__all__ = [
    "BATCH_TIME_BUCKETS",
    "ExporterError",
    "MetricsServer",
    "Peak",
    "PrometheusTrainingCallback",
    "best_seconds",
    "device_memory",
    "host_memory_used_bytes",
    "measure_matmul_flops",
    "measure_peak",
    "peak_flops",
    "start_server",
    "utilization",
]
