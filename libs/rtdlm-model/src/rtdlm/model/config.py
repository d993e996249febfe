"""Model configuration: one frozen dataclass, validated on construction, and the named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

COMPUTE_DTYPES = ("float32", "bfloat16")
# blocked: causal query blocks against their key prefix (rtdlm.model.attention), the CPU's
# fastest; xla and cudnn: jax.nn.dot_product_attention with a dense mask; auto: JAX chooses.
ATTENTION_IMPLS = ("blocked", "xla", "cudnn", "auto")
REMAT_POLICIES = ("none", "full", "dots_saveable")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer. The vocabulary comes from the data, not the preset."""

    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    seq_len: int
    vocab_size: int = 256
    d_ff: int | None = None  # SwiGLU width; None: 8/3 d_model rounded up to a multiple of 256
    rope_base: float = 10_000.0
    tie_embeddings: bool = True
    compute_dtype: str = "float32"  # parameters always stay float32; logits and loss too
    attention: str = "blocked"
    # query rows per block of blocked attention; None: the machine's (attention.default_block)
    attention_block: int | None = None
    remat: str = "none"
    norm_eps: float = 1e-6
    moe_every: int = 0  # every N-th block's MLP is a mixture of experts; 0: none
    num_experts: int = 8
    experts_per_token: int = 2
    capacity_factor: float = 1.25
    scan_layers: bool = False  # one lax.scan over stacked blocks: compile time flat in depth

    def __post_init__(self) -> None:
        sizes = ("d_model", "num_layers", "num_heads", "num_kv_heads", "seq_len", "vocab_size")
        positive = ("rope_base", "norm_eps", "num_experts", "experts_per_token")
        for name in (*sizes, *positive):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.attention_block is not None and not self.attention_block > 0:
            raise ValueError(
                f"model.attention_block must be positive (or null: the machine's), got "
                f"{self.attention_block}"
            )
        if self.d_ff is not None and self.d_ff <= 0:
            raise ValueError(f"model.d_ff must be positive, got {self.d_ff}")
        if self.moe_every < 0 or not self.capacity_factor > 0:
            raise ValueError(
                f"model.moe_every must be >= 0 and model.capacity_factor > 0, got "
                f"{self.moe_every} and {self.capacity_factor}"
            )
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"model.experts_per_token ({self.experts_per_token}) cannot exceed "
                f"model.num_experts ({self.num_experts})"
            )
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"model.scan_layers must be true or false, got {self.scan_layers!r}")
        if self.scan_layers and self.moe_every and self.num_layers % self.moe_every:
            raise ValueError(
                f"model.scan_layers needs model.num_layers ({self.num_layers}) divisible by "
                f"model.moe_every ({self.moe_every}), since it scans over groups of moe_every "
                "blocks; change one of them or set model.scan_layers=false"
            )
        if self.d_model % self.num_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must divide model.d_model ({self.d_model})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_kv_heads ({self.num_kv_heads}) must divide "
                f"model.num_heads ({self.num_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"model.d_model / model.num_heads = {self.head_dim} must be even for rotary "
                "embeddings"
            )
        for name, choices in (
            ("compute_dtype", COMPUTE_DTYPES),
            ("attention", ATTENTION_IMPLS),
            ("remat", REMAT_POLICIES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"model.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_every > 0 and (layer + 1) % self.moe_every == 0

    @property
    def scan_group(self) -> int:
        """Blocks per scan step: 1, or with MoE the repeating moe_every (dense..., then MoE)."""
        return self.moe_every if self.moe_every > 0 else 1

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return 256 * math.ceil(8 * self.d_model / 3 / 256)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, seq_len=256),
    "small": ModelConfig(
        d_model=768, num_layers=12, num_heads=12, num_kv_heads=4, seq_len=1024, d_ff=2304
    ),
    "medium": ModelConfig(
        d_model=1024,
        num_layers=24,
        num_heads=16,
        num_kv_heads=8,
        seq_len=2048,
        tie_embeddings=False,
        scan_layers=True,  # deep: one scanned block compiles faster, and remat saves memory
    ),
    "large": ModelConfig(
        d_model=2048,
        num_layers=24,
        num_heads=16,
        num_kv_heads=8,
        seq_len=2048,
        tie_embeddings=False,
        scan_layers=True,  # deep: one scanned block compiles faster, and remat saves memory
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
