"""Model configuration: one frozen dataclass and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer. The vocabulary comes from the data, not the preset."""

    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    seq_len: int
    vocab_size: int = 256
    mlp_ratio: float = 4.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("d_model", "num_layers", "num_heads", "num_kv_heads", "seq_len", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must divide model.d_model ({self.d_model})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_kv_heads ({self.num_kv_heads}) must divide "
                f"model.num_heads ({self.num_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def d_ff(self) -> int:
        return int(self.mlp_ratio * self.d_model)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, seq_len=256),
    "small": ModelConfig(d_model=768, num_layers=12, num_heads=12, num_kv_heads=4, seq_len=1024),
    "medium": ModelConfig(d_model=1024, num_layers=24, num_heads=16, num_kv_heads=8, seq_len=2048),
    "large": ModelConfig(
        d_model=2048,
        num_layers=24,
        num_heads=16,
        num_kv_heads=8,
        seq_len=2048,
        tie_embeddings=False,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with any fields replaced; unknown names and fields raise ValueError."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown model field(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
        )
    return dataclasses.replace(PRESETS[name], **overrides)
