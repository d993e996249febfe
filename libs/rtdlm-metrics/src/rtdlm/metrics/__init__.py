"""rtdlm.metrics: Prometheus metrics for training."""

from rtdlm.metrics.training import TrainingMetrics, record_step, training_metrics

__all__ = ["TrainingMetrics", "record_step", "training_metrics"]
