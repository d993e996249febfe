"""rtdlm.train: configuration, data, optimizer and the training loop."""

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
from rtdlm.train.loop import Batch, EvalLog, StepLog, TrainState, train

__all__ = [
    "BYTE_VOCAB_SIZE",
    "Batch",
    "ConfigError",
    "DataConfig",
    "EvalLog",
    "MetricsConfig",
    "OptimizerConfig",
    "RunConfig",
    "Splits",
    "StepLog",
    "TrainConfig",
    "TrainState",
    "decode",
    "encode",
    "load_yaml",
    "resolve",
    "split_documents",
    "to_yaml",
    "train",
]
