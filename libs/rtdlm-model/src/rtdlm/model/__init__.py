"""rtdlm.model: the decoder-only transformer, its presets and its accounting."""

from rtdlm.model.accounting import (
    MemoryEstimate,
    flops_per_token,
    memory_estimate,
    non_embedding_params,
    param_count,
)
from rtdlm.model.config import PRESETS, ModelConfig, preset
from rtdlm.model.transformer import build, count_params, forward

__all__ = [
    "PRESETS",
    "MemoryEstimate",
    "ModelConfig",
    "build",
    "count_params",
    "flops_per_token",
    "forward",
    "memory_estimate",
    "non_embedding_params",
    "param_count",
    "preset",
]
