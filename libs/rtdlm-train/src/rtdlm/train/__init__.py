"""rtdlm.train: configuration, data, the training step, and the run (Trainer)."""

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
from rtdlm.train.data import BYTE_VOCAB_SIZE, Splits, decode, encode, split_documents
from rtdlm.train.loop import Batch, TrainState
from rtdlm.train.rundir import RunDirError
from rtdlm.train.trainer import RunResult, Trainer

__all__ = [
    "BYTE_VOCAB_SIZE",
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
    "Splits",
    "StepLog",
    "StepsFile",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "decode",
    "encode",
    "load_yaml",
    "resolve",
    "split_documents",
    "to_yaml",
]
