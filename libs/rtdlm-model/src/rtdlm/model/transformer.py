"""A decoder-only transformer in Haiku: pre-norm RMSNorm blocks, rotary positions,
grouped-query attention and a SwiGLU MLP. The model reads top-down in `transformer`, `block`,
`causal_self_attention` and `swiglu_mlp`; the rest is hand-written gradients, the KV cache and
the layer scan.

Parameters are created and stored in float32; they are cast to `compute_dtype` where they are
read, and the logits come back in float32 (mixed precision without global policy state).

Blocks are traced one by one (parameters block_0/..., block_1/...) or, with cfg.scan_layers,
as one lax.scan (parameters stacked under layers/...), which keeps compile time flat in depth;
stack_layers and unstack_layers convert parameters between the two layouts.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from rtdlm.model.attention import attention_mask, blocked_causal_attention, default_block
from rtdlm.model.config import ModelConfig
from rtdlm.model.linear import Embedding, linear, linears, swiglu
from rtdlm.model.moe import MoEStats, moe_mlp
from rtdlm.model.partitioning import constrain

REMAT = {"full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable}
DENSE_IMPLEMENTATION = {"xla": "xla", "cudnn": "cudnn", "auto": None, "blocked": "xla"}


def _inverse_rms(x: jax.Array, eps: float) -> jax.Array:
    return jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (x32 * scale * _inverse_rms(x32, eps)).astype(x.dtype)


def _rms_norm_fwd(
    x: jax.Array, scale: jax.Array, eps: float
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _rms_norm(x, scale, eps), (x, scale)


def _rms_norm_bwd(
    eps: float, residuals: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    x, scale = residuals
    x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
    inverse_rms = _inverse_rms(x32, eps)
    x_hat, g_scaled = x32 * inverse_rms, g32 * scale.astype(jnp.float32)
    dx = inverse_rms * (g_scaled - x_hat * jnp.mean(g_scaled * x_hat, axis=-1, keepdims=True))
    rows = (g32 * x_hat).reshape(-1, x.shape[-1])
    ones = jnp.ones(rows.shape[:1], jnp.float32)
    d_scale = jax.lax.dot_general(ones, rows, (((0,), (0,)), ((), ())))  # sum over rows
    return dx.astype(x.dtype), d_scale.astype(scale.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rms_norm(x: jax.Array, cfg: ModelConfig, name: str) -> jax.Array:
    """RMSNorm computed in float32 whatever the compute dtype, for stability: hk.RMSNorm's
    parameter and arithmetic, with the gradient written out. Under autodiff XLA:CPU summed the
    scale's gradient as a slow tree of windowed reductions; a dot against ones is one pass
    instead (float32 losses bit for bit the same)."""
    scale = hk.to_module(lambda: hk.get_parameter("scale", [x.shape[-1]], init=jnp.ones))(
        name=name
    )()
    return _rms_norm(x, scale, cfg.norm_eps)


class Rotary(NamedTuple):
    cos: jax.Array  # [batch, time, 1, head_dim / 2]
    sin: jax.Array


def rotary_angles(
    positions: jax.Array, head_dim: int, base: float, table_size: int | None = None
) -> Rotary:
    """cos and sin [batch, time, 1, head_dim / 2] of each position's rotation angles, shared
    by every layer's queries and keys.

    With `table_size` (positions known to lie in 0 .. table_size - 1, as in training), they are
    looked up in a table of every position: XLA:CPU fuses cos and sin into each rotation that
    reads them (every head, forward and backward) instead of computing them once, while the
    table is a compile-time constant and each rotation only gathers from it (bit for bit the
    same loss)."""
    half = head_dim // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if table_size is None:
        angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, time, half]
        cos, sin = jnp.cos(angles), jnp.sin(angles)
    else:
        table = jnp.arange(table_size, dtype=jnp.float32)[:, None] * inv_freq  # [table, half]
        cos, sin = jnp.cos(table)[positions], jnp.sin(table)[positions]
    return Rotary(cos[:, :, None, :], sin[:, :, None, :])


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@jax.custom_vjp
def apply_rotary(x: jax.Array, rotary: Rotary) -> jax.Array:
    """Rotates feature pairs of x [batch, time, heads, head_dim] by position-dependent angles.

    A rotation's gradient is the inverse rotation, one pass in x's dtype; autodiff's went
    through float32 copies of every head, fused with the attention's transposes (float32
    losses bit for bit the same)."""
    return _rotate(x, *rotary)


def _apply_rotary_fwd(x: jax.Array, rotary: Rotary) -> tuple[jax.Array, Rotary]:
    return apply_rotary(x, rotary), rotary


def _apply_rotary_bwd(rotary: Rotary, g: jax.Array) -> tuple[jax.Array, None]:
    return _rotate(g, rotary.cos, -rotary.sin), None  # positions are not trained


apply_rotary.defvjp(_apply_rotary_fwd, _apply_rotary_bwd)


class KVCache(NamedTuple):
    """Keys and values of every layer for the first `length` positions of each sequence."""

    k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    v: jax.Array
    length: jax.Array  # int32 scalar


LayerCache = tuple[jax.Array, jax.Array, jax.Array]  # (k, v, length) of one layer


class Context(NamedTuple):
    """Where each token sits and what it may attend to, shared by every block."""

    rotary: Rotary  # of positions that restart at 0 in each packed document
    segment_ids: jax.Array | None  # training: causal attention within each document
    mask: jax.Array | None  # decoding: [batch, 1, time, cache length], what each query sees


def context(
    positions: jax.Array,
    cfg: ModelConfig,
    segment_ids: jax.Array | None,
    mask: jax.Array | None,
    table_size: int | None = None,
) -> Context:
    rotary = rotary_angles(positions, cfg.head_dim, cfg.rope_base, table_size)
    return Context(rotary, segment_ids, mask)


def causal_self_attention(
    x: jax.Array,
    ctx: Context,
    cfg: ModelConfig,
    cache: LayerCache | None = None,
) -> tuple[jax.Array, LayerCache | None]:
    batch, time, _ = x.shape
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    q, k, v = linears(x, [("query", q_size), ("key", kv_size), ("value", kv_size)])
    q = apply_rotary(q.reshape(batch, time, cfg.num_heads, -1), ctx.rotary)
    k = apply_rotary(k.reshape(batch, time, cfg.num_kv_heads, -1), ctx.rotary)
    v = v.reshape(batch, time, cfg.num_kv_heads, cfg.head_dim)
    q, k, v = (constrain(a, "batch", "length", "act_heads", None) for a in (q, k, v))
    if (
        cache is not None
    ):  # decoding: append to the cache, attend over all of it (mask says how far)
        k_cache, v_cache, length = cache
        k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, length, 0, 0))
        v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, length, 0, 0))
        cache = (k, v, length)
    mask, segment_ids = ctx.mask, ctx.segment_ids
    if mask is None and cfg.attention == "blocked":
        segments = jnp.zeros((batch, time), jnp.int32) if segment_ids is None else segment_ids
        block = cfg.attention_block or default_block()
        y = blocked_causal_attention(q, k, v, segments, block)
    else:
        if mask is None and segment_ids is not None:
            mask = attention_mask(segment_ids)
        # Grouped-query attention: each kv head serves its group of query heads.
        y = jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=mask is None,
            implementation=DENSE_IMPLEMENTATION[cfg.attention],  # type: ignore[arg-type]
        )
    return linear(y.reshape(batch, time, -1), cfg.d_model, "out"), cache


def swiglu_mlp(x: jax.Array, cfg: ModelConfig) -> jax.Array:
    hidden = constrain(swiglu(x, cfg.ffn_dim), "batch", "length", "act_mlp")
    return linear(hidden, cfg.d_model, "down")


def block(
    x: jax.Array,
    ctx: Context,
    cfg: ModelConfig,
    use_moe: bool,
    cache: LayerCache | None = None,
) -> tuple[jax.Array, LayerCache | None, MoEStats]:
    attn = hk.to_module(causal_self_attention)(name="attn")
    y, cache = attn(rms_norm(x, cfg, "attn_norm"), ctx, cfg, cache)
    x = constrain(x + y, "batch", "length", "act_embed")
    if use_moe:
        y, stats = hk.to_module(moe_mlp)(name="moe")(rms_norm(x, cfg, "mlp_norm"), cfg)
        return constrain(x + y, "batch", "length", "act_embed"), cache, stats
    y = hk.to_module(swiglu_mlp)(name="mlp")(rms_norm(x, cfg, "mlp_norm"), cfg)
    return constrain(x + y, "batch", "length", "act_embed"), cache, MoEStats.zeros()


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 where each packed document starts."""
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def apply_block(
    name: str,
    x: jax.Array,
    ctx: Context,
    cfg: ModelConfig,
    use_moe: bool,
    cache: LayerCache | None,
) -> tuple[jax.Array, LayerCache | None, MoEStats]:
    """One block as the module `name`; in training, rematerialised under cfg.remat."""
    layer_fn = hk.to_module(block)(name=name)
    if cache is None and cfg.remat != "none":
        layer_fn = hk.remat(layer_fn, policy=REMAT[cfg.remat], static_argnums=(2, 3))
    return layer_fn(x, ctx, cfg, use_moe, cache)


KV = tuple[jax.Array, jax.Array]  # keys and values of consecutive layers, [layers, ...] each


def run_blocks(
    x: jax.Array,
    ctx: Context,
    cfg: ModelConfig,
    names: list[str],
    cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, KV | None, MoEStats]:
    """The blocks `names` one after another (the i-th is MoE where cfg.is_moe_layer(i)), their
    MoE stats summed; when decoding, their caches (k, v, length) go in and come back grown."""
    new_k, new_v, stats = [], [], MoEStats.zeros()
    for i, name in enumerate(names):
        layer_cache = None if cache is None else (cache[0][i], cache[1][i], cache[2])
        x, layer_cache, layer_stats = apply_block(
            name, x, ctx, cfg, cfg.is_moe_layer(i), layer_cache
        )
        stats = MoEStats(*(a + b for a, b in zip(stats, layer_stats, strict=True)))
        if layer_cache is not None:
            new_k.append(layer_cache[0])
            new_v.append(layer_cache[1])
    return x, (jnp.stack(new_k), jnp.stack(new_v)) if cache is not None else None, stats


def scan_slots(cfg: ModelConfig) -> list[str]:
    """Module names of the blocks in one scan step: "block", or block_0 ... when grouped."""
    if cfg.scan_group == 1:
        return ["block"]
    return [f"block_{j}" for j in range(cfg.scan_group)]


def scanned_blocks(
    x: jax.Array,
    ctx: Context,
    cfg: ModelConfig,
    cache: KVCache | None,
) -> tuple[jax.Array, KV | None, MoEStats]:
    """All blocks as one lax.scan, so that compile time does not grow with depth.

    A scan step runs one group of cfg.scan_group blocks (with MoE: moe_every - 1 dense blocks,
    then the MoE one), its parameters stacked along a leading axis under layers/. When
    decoding, the group's slice of the cache is a scanned input and its update an output.
    """
    size, groups = cfg.scan_group, cfg.num_layers // cfg.scan_group

    def group(
        carry: tuple[jax.Array, MoEStats], *kv: jax.Array
    ) -> tuple[tuple[jax.Array, MoEStats], KV | None]:
        x, stats = carry
        group_cache = (kv[0], kv[1], cache.length) if cache is not None else None
        x, kv_out, group_stats = run_blocks(x, ctx, cfg, scan_slots(cfg), group_cache)
        return (x, MoEStats(*(a + b for a, b in zip(stats, group_stats, strict=True)))), kv_out

    # Caches [layers, ...] as [groups, size, ...]: one group's slice per scan step.
    kv = () if cache is None else tuple(c.reshape(groups, size, *c.shape[1:]) for c in cache[:2])
    stack = hk.layer_stack(groups, with_per_layer_inputs=True, name="layers")
    (x, stats), new_kv = stack(group)((x, MoEStats.zeros()), *kv)
    if new_kv is None:
        return x, None, stats
    k, v = (c.reshape(cfg.num_layers, *c.shape[2:]) for c in new_kv)
    return x, (k, v), stats


def transformer(
    tokens: jax.Array,
    ctx: Context,
    cfg: ModelConfig,
    cache: KVCache | None = None,
) -> tuple[jax.Array, KVCache | None, MoEStats]:
    """The network itself: float32 logits, the updated cache when decoding, MoE statistics."""
    compute = jnp.dtype(cfg.compute_dtype)

    def create_float32(next_creator: Any, shape: Any, dtype: Any, init: Any, context: Any) -> Any:
        return next_creator(shape, jnp.float32, init)

    def cast_to_compute(next_getter: Any, value: jax.Array, context: Any) -> Any:
        floating = jnp.issubdtype(value.dtype, jnp.floating)
        return next_getter(value.astype(compute) if floating else value)

    with hk.custom_creator(create_float32), hk.custom_getter(cast_to_compute):
        embed = Embedding(cfg.vocab_size, cfg.d_model)
        x = constrain(embed(tokens, compute), "batch", "length", "act_embed")
        if cfg.scan_layers:
            x, kv, stats = scanned_blocks(x, ctx, cfg, cache)
        else:  # every block traced on its own, as modules block_0 ... block_{L-1}
            names = [f"block_{layer}" for layer in range(cfg.num_layers)]
            x, kv, stats = run_blocks(x, ctx, cfg, names, cache)
        x = rms_norm(x, cfg, "final_norm")
        tied = cfg.tie_embeddings
        logits = embed.unembed(x) if tied else linear(x, cfg.vocab_size, "unembed")
    if cache is not None:
        assert kv is not None  # nosec B101 # narrows a type; decoding always returns caches
        cache = KVCache(*kv, cache.length + tokens.shape[1])
    logits = constrain(logits.astype(jnp.float32), "batch", "length", "act_vocab")
    return logits, cache, stats


def forward_with_stats(
    tokens: jax.Array, cfg: ModelConfig, segment_ids: jax.Array | None = None
) -> tuple[jax.Array, MoEStats]:
    """float32 logits [batch, time, vocab] for integer tokens [batch, time], and the MoE losses
    and drop counts. With segment_ids, packed documents never attend to each other and each
    one's positions start at 0."""
    if segment_ids is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    else:
        positions = segment_positions(segment_ids)
    # Positions restart within the sequence, so they never reach its length.
    ctx = context(positions, cfg, segment_ids, None, table_size=tokens.shape[1])
    logits, _, stats = transformer(tokens, ctx, cfg)
    return logits, stats


def forward(tokens: jax.Array, cfg: ModelConfig, segment_ids: jax.Array | None = None) -> jax.Array:
    return forward_with_stats(tokens, cfg, segment_ids)[0]


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> KVCache:
    shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    zeros = jnp.zeros(shape, cfg.compute_dtype)
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32))


def decode(tokens: jax.Array, cfg: ModelConfig, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Logits for `tokens` [batch, time] following the cached ones, and the grown cache.

    Prefill passes the whole prompt at once; generation then passes one token at a time.
    """
    time, max_len = tokens.shape[1], cache.k.shape[2]
    query_positions = cache.length + jnp.arange(time)
    mask = (jnp.arange(max_len)[None, :] <= query_positions[:, None])[None, None]
    positions = jnp.broadcast_to(query_positions, tokens.shape)
    logits, new_cache, _ = transformer(tokens, context(positions, cfg, None, mask), cfg, cache)
    assert new_cache is not None  # nosec B101 # narrows a type; decoding always returns caches
    return logits, new_cache


def build(cfg: ModelConfig) -> hk.Transformed:
    """The pure (init, apply) pair; apply takes (params, rng, tokens[, segment_ids])."""
    return hk.transform(lambda tokens, segment_ids=None: forward(tokens, cfg, segment_ids))


def build_with_stats(cfg: ModelConfig) -> hk.Transformed:
    """Like build, but apply returns (logits, MoEStats) for the training loss."""
    return hk.transform(
        lambda tokens, segment_ids=None: forward_with_stats(tokens, cfg, segment_ids)
    )


def build_decoder(cfg: ModelConfig) -> hk.Transformed:
    """apply(params, rng, tokens, cache) -> (logits, cache), with the same params as build."""
    return hk.transform(lambda tokens, cache: decode(tokens, cfg, cache))


def count_params(params: hk.Params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def stack_layers(params: hk.Params, cfg: ModelConfig) -> hk.Params:
    """Looped-layout parameters (block_0/...) in the scanned layout (layers/...) of cfg:
    block g * cfg.scan_group + j becomes row g of slot j. Values are unchanged."""
    size, groups = cfg.scan_group, cfg.num_layers // cfg.scan_group
    if f"block_{cfg.num_layers - 1}/attn/query" not in params:
        raise ValueError(f"params are not the looped layout of a {cfg.num_layers}-layer model")
    out = {name: dict(p) for name, p in params.items() if not name.startswith("block_")}
    for j, slot in enumerate(scan_slots(cfg)):
        for name in [n for n in params if n.startswith(f"block_{j}/")]:
            module = name.split("/", 1)[1]
            rows = [params[f"block_{g * size + j}/{module}"] for g in range(groups)]
            out[f"layers/{slot}/{module}"] = {k: jnp.stack([r[k] for r in rows]) for k in rows[0]}
    return out


def unstack_layers(params: hk.Params, cfg: ModelConfig) -> hk.Params:
    """The inverse of stack_layers: scanned-layout parameters back as block_0 ... block_{L-1}."""
    size, slots = cfg.scan_group, scan_slots(cfg)
    query = params.get(f"layers/{slots[-1]}/attn/query", {}).get("w")
    if query is None or query.shape[0] != cfg.num_layers // size:
        raise ValueError(f"params are not the scanned layout of a {cfg.num_layers}-layer model")
    out = {name: dict(p) for name, p in params.items() if not name.startswith("layers/")}
    for j, slot in enumerate(slots):
        for name in [n for n in params if n.startswith(f"layers/{slot}/")]:
            module = name.split("/", 2)[2]
            for g in range(cfg.num_layers // size):
                out[f"block_{g * size + j}/{module}"] = {k: v[g] for k, v in params[name].items()}
    return out
