"""rtdlm.train: data, optimizer and the training loop."""

from rtdlm.train.data import BYTE_VOCAB_SIZE, Splits, decode, encode, split_documents
from rtdlm.train.loop import EvalLog, StepLog, TrainConfig, TrainState, train

__all__ = [
    "BYTE_VOCAB_SIZE",
    "EvalLog",
    "Splits",
    "StepLog",
    "TrainConfig",
    "TrainState",
    "decode",
    "encode",
    "split_documents",
    "train",
]
