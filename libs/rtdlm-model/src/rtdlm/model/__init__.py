"""rtdlm.model: the decoder-only transformer, its presets and its accounting."""

from rtdlm.model.config import PRESETS, ModelConfig, preset
from rtdlm.model.transformer import build, forward, param_count

__all__ = ["PRESETS", "ModelConfig", "build", "forward", "param_count", "preset"]
