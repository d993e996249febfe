"""rtdlm.model: the decoder-only transformer, its presets and its accounting."""

from rtdlm.model.accounting import (
    MemoryEstimate,
    flops_per_token,
    memory_estimate,
    non_embedding_params,
    param_count,
)
from rtdlm.model.config import PRESETS, ModelConfig, preset
from rtdlm.model.generate import Generation, generate, sample
from rtdlm.model.moe import MoEStats
from rtdlm.model.partitioning import axis_rules, constrain, params_axes
from rtdlm.model.transformer import (
    KVCache,
    build,
    build_decoder,
    build_with_stats,
    count_params,
    decode,
    forward,
    init_cache,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "PRESETS",
    "Generation",
    "KVCache",
    "MemoryEstimate",
    "ModelConfig",
    "MoEStats",
    "axis_rules",
    "build",
    "build_decoder",
    "build_with_stats",
    "constrain",
    "count_params",
    "decode",
    "flops_per_token",
    "forward",
    "generate",
    "init_cache",
    "memory_estimate",
    "non_embedding_params",
    "param_count",
    "params_axes",
    "preset",
    "sample",
    "stack_layers",
    "unstack_layers",
]
