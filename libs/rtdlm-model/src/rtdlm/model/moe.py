"""Mixture-of-experts SwiGLU MLP with top-k routing and a fixed capacity per expert.

Dispatch is real: each expert runs on at most `capacity` tokens gathered into its own buffer,
never on every token. Assignments past an expert's capacity are dropped (the token keeps its
residual path) and counted. Choice rank comes before token order, so a token's first choice
is placed before anyone's second.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from rtdlm.model.config import ModelConfig
from rtdlm.model.linear import linear, matmul
from rtdlm.model.partitioning import constrain


class MoEStats(NamedTuple):
    """Summed over MoE layers; zeros for a dense model."""

    load_balance_loss: jax.Array  # Switch Transformer: E * sum_e (routed fraction * mean prob)
    router_z_loss: jax.Array  # mean squared log-partition of router logits (ST-MoE)
    dropped: jax.Array  # token-to-expert assignments dropped for capacity
    assignments: jax.Array  # token-to-expert assignments made

    @staticmethod
    def zeros() -> MoEStats:
        zero = jnp.zeros((), jnp.float32)
        return MoEStats(zero, zero, zero, zero)


def capacity(cfg: ModelConfig, num_tokens: int) -> int:
    return max(
        1, math.ceil(cfg.capacity_factor * num_tokens * cfg.experts_per_token / cfg.num_experts)
    )


def route(
    router_logits: jax.Array, cfg: ModelConfig, cap: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, MoEStats]:
    """Per (choice, token) assignment, flattened choice-major: expert, slot, weight, kept."""
    num_tokens = router_logits.shape[0]
    probs = jax.nn.softmax(router_logits, axis=-1)
    top_probs, top_experts = jax.lax.top_k(probs, cfg.experts_per_token)  # [tokens, k]
    weights = top_probs / top_probs.sum(axis=-1, keepdims=True)  # sum to 1 over chosen experts
    experts = top_experts.T.reshape(-1)  # [k * tokens], all first choices, then second, ...
    onehot = jax.nn.one_hot(experts, cfg.num_experts, dtype=jnp.int32)
    slot = ((jnp.cumsum(onehot, axis=0) - 1) * onehot).sum(axis=-1)
    kept = slot < cap
    routed_fraction = onehot.sum(axis=0) / (num_tokens * cfg.experts_per_token)
    load_balance = cfg.num_experts * jnp.sum(routed_fraction * probs.mean(axis=0))
    z_loss = jnp.mean(jax.nn.logsumexp(router_logits, axis=-1) ** 2)
    stats = MoEStats(
        load_balance,
        z_loss,
        jnp.sum(~kept).astype(jnp.float32),
        jnp.asarray(kept.size, jnp.float32),
    )
    return experts, slot, weights.T.reshape(-1), kept, stats


def moe_mlp(x: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, MoEStats]:
    batch, time, d = x.shape
    tokens = x.reshape(-1, d)
    num_tokens = tokens.shape[0]
    cap = capacity(cfg, num_tokens)
    router_logits = linear(tokens, cfg.num_experts, "router").astype(jnp.float32)
    experts, slot, weights, kept, stats = route(router_logits, cfg, cap)
    token_index = jnp.tile(jnp.arange(num_tokens), cfg.experts_per_token)

    # Gather each expert's tokens into its [capacity, d] buffer; dropped ones fall off the end.
    buffers = jnp.zeros((cfg.num_experts, cap, d), x.dtype)
    buffers = buffers.at[experts, slot].set(tokens[token_index], mode="drop")
    buffers = constrain(buffers, "act_expert", None, "act_embed")  # each expert's tokens go to it

    init = hk.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal")
    shape_in, shape_out = (cfg.num_experts, d, cfg.ffn_dim), (cfg.num_experts, cfg.ffn_dim, d)
    per_expert = functools.partial(jnp.einsum, "ecd,edf->ecf")
    hidden = jax.nn.silu(matmul(per_expert, buffers, "w_gate", shape_in, init))
    hidden = hidden * matmul(per_expert, buffers, "w_up", shape_in, init)
    hidden = constrain(hidden, "act_expert", None, "act_mlp")
    outputs = matmul(per_expert, hidden, "w_down", shape_out, init)
    outputs = constrain(outputs, "act_expert", None, "act_embed")

    # Scatter back: each kept assignment adds its expert's output, weighted by the router.
    gathered = outputs.at[experts, slot].get(mode="fill", fill_value=0)
    contribution = gathered * (weights * kept)[:, None].astype(x.dtype)
    combined = jnp.zeros_like(tokens).at[token_index].add(contribution)
    return combined.reshape(batch, time, d), stats
