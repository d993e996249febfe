"""rtdlm.train: configuration, the training step, and the run (Trainer); data is rtdlm.data's."""

from rtdlm.train.callbacks import (
    Callback,
    CheckpointLog,
    EvalLog,
    Progress,
    Prometheus,
    StepLog,
    StepsFile,
)
from rtdlm.train.config import (
    ConfigError,
    DataConfig,
    MetricsConfig,
    OptimizerConfig,
    RunConfig,
    TrainConfig,
    load_yaml,
    resolve,
    to_yaml,
)
from rtdlm.train.loop import Batch, TrainState
from rtdlm.train.rundir import RunDirError
from rtdlm.train.trainer import RunResult, Trainer

__all__ = [
    "Batch",
    "Callback",
    "CheckpointLog",
    "ConfigError",
    "DataConfig",
    "EvalLog",
    "MetricsConfig",
    "OptimizerConfig",
    "Progress",
    "Prometheus",
    "RunConfig",
    "RunDirError",
    "RunResult",
    "StepLog",
    "StepsFile",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "load_yaml",
    "resolve",
    "to_yaml",
]
