"""A pre-norm decoder-only transformer in Haiku, small enough to read on one screen."""

from __future__ import annotations

import haiku as hk
import jax

from rtdlm.model.config import ModelConfig


def causal_self_attention(x: jax.Array, cfg: ModelConfig) -> jax.Array:
    batch, time, _ = x.shape
    q = hk.Linear(cfg.num_heads * cfg.head_dim, with_bias=False, name="query")(x)
    k = hk.Linear(cfg.num_kv_heads * cfg.head_dim, with_bias=False, name="key")(x)
    v = hk.Linear(cfg.num_kv_heads * cfg.head_dim, with_bias=False, name="value")(x)
    q = q.reshape(batch, time, cfg.num_heads, cfg.head_dim)
    k = k.reshape(batch, time, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(batch, time, cfg.num_kv_heads, cfg.head_dim)
    # Grouped-query attention: dot_product_attention shares each kv head across its query group.
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return hk.Linear(cfg.d_model, with_bias=False, name="out")(y.reshape(batch, time, -1))


def mlp(x: jax.Array, cfg: ModelConfig) -> jax.Array:
    h = jax.nn.gelu(hk.Linear(cfg.d_ff, name="up")(x))
    return hk.Linear(cfg.d_model, name="down")(h)


def block(x: jax.Array, cfg: ModelConfig) -> jax.Array:
    x = x + hk.to_module(causal_self_attention)(name="attn")(hk.RMSNorm(-1, name="ln1")(x), cfg)
    return x + hk.to_module(mlp)(name="mlp")(hk.RMSNorm(-1, name="ln2")(x), cfg)


def forward(tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits of shape [batch, time, vocab] for integer tokens of shape [batch, time]."""
    _, time = tokens.shape
    embed = hk.Embed(
        cfg.vocab_size, cfg.d_model, w_init=hk.initializers.TruncatedNormal(0.02), name="embed"
    )
    positions = hk.get_parameter(
        "positions", [cfg.seq_len, cfg.d_model], init=hk.initializers.TruncatedNormal(0.02)
    )
    x = embed(tokens) + positions[:time]
    for layer in range(cfg.num_layers):
        x = hk.to_module(block)(name=f"block_{layer}")(x, cfg)
    x = hk.RMSNorm(-1, name="ln_f")(x)
    if cfg.tie_embeddings:
        return x @ embed.embeddings.T
    return hk.Linear(cfg.vocab_size, with_bias=False, name="unembed")(x)


def build(cfg: ModelConfig) -> hk.Transformed:
    """The pure (init, apply) pair for a config; apply takes (params, rng, tokens)."""
    return hk.transform(lambda tokens: forward(tokens, cfg))


def param_count(params: hk.Params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
