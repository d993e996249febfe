"""What a config costs: parameters, training FLOPs per token and memory, from the config alone.

The trainer uses these for MFU and `--dry-run`; tests hold them to the real parameter tree, in
both layouts (scan_layers stacks the same arrays, so every count is the same).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rtdlm.model.config import ModelConfig

BYTES = {"float32": 4, "bfloat16": 2}


def layer_params(cfg: ModelConfig, layer: int, active_only: bool = False) -> int:
    """Parameters of one block; with active_only, only the experts a token actually uses."""
    attention = cfg.d_model * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.d_model * cfg.ffn_dim
    if cfg.is_moe_layer(layer):
        experts = cfg.experts_per_token if active_only else cfg.num_experts
        mlp = mlp * experts + cfg.d_model * cfg.num_experts  # plus the router
    return attention + mlp + 2 * cfg.d_model  # two RMSNorm scales


def non_embedding_params(cfg: ModelConfig, active_only: bool = False) -> int:
    """Blocks and the final norm: the number model sizes are usually quoted by."""
    blocks = sum(layer_params(cfg, layer, active_only) for layer in range(cfg.num_layers))
    return blocks + cfg.d_model


def param_count(cfg: ModelConfig) -> int:
    embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return non_embedding_params(cfg) + embeddings


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token, forward plus backward (3x forward), multiply-add = 2 FLOPs.

    Counts every matmul including the output projection, not the embedding lookup. Causal
    attention scores and the weighted sum are counted at half of the full T x T, since half the
    pairs are masked (as in the PaLM MFU convention's causal variant).
    """
    seq_len = cfg.seq_len if seq_len is None else seq_len
    norms = cfg.d_model * (2 * cfg.num_layers + 1)
    matmul_params = non_embedding_params(cfg, active_only=True) - norms  # MoE: the used experts
    forward = 2 * (matmul_params + cfg.vocab_size * cfg.d_model)
    forward += 2 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim  # QK^T and AV, halved
    return 3.0 * forward


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    gradients: int
    optimizer_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.gradients + self.optimizer_state + self.activations


def activation_values_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Values one block keeps for the backward pass, per token, under cfg.remat.

    Counted from the block's code: norms, q/k/v before and after rotation, attention scores and
    probabilities (dense attention materialises them; blocked attention keeps its head-major
    copies of q/k/v, its output and a log-sum-exp per head instead), projections and the four
    SwiGLU tensors. "full" keeps only the block input; "dots_saveable" keeps only matmul outputs.
    """
    d, kv, ffn = cfg.d_model, cfg.num_kv_heads * cfg.head_dim, cfg.ffn_dim
    if cfg.attention == "blocked":
        # head-major q/k/v (XLA:CPU keeps them beside the time-major ones), output, log-sum-exp
        probabilities, scores = 2 * d + 2 * kv + cfg.num_heads, 0  # no T x T
    else:
        probabilities = scores = cfg.num_heads * seq_len
    if cfg.remat == "full":
        return d
    if cfg.remat == "dots_saveable":
        return 4 * d + 2 * kv + 2 * ffn + scores
    return 9 * d + 3 * kv + 4 * ffn + scores + probabilities


def memory_estimate(
    cfg: ModelConfig, batch_size: int, seq_len: int | None = None
) -> MemoryEstimate:
    """Bytes to train with AdamW: float32 params, gradients and two moments, plus activations
    in the compute dtype (with remat, one block's full set is live again during its backward),
    plus float32 logits and their gradient. XLA's own buffer reuse makes real peaks lower."""
    seq_len = cfg.seq_len if seq_len is None else seq_len
    n = param_count(cfg)
    tokens = batch_size * seq_len
    value = BYTES[cfg.compute_dtype]
    kept = cfg.num_layers * activation_values_per_token(cfg, seq_len)
    if cfg.remat != "none":
        kept += activation_values_per_token(dataclasses.replace(cfg, remat="none"), seq_len)
    logits = 2 * 4 * cfg.vocab_size
    return MemoryEstimate(
        params=4 * n,
        gradients=4 * n,
        optimizer_state=8 * n,
        activations=tokens * (value * kept + logits),
    )
