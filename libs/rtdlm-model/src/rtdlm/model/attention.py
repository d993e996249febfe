"""Causal attention over packed documents, in query blocks that skip the masked keys.

Dense attention writes a [batch, heads, T, T] score tensor and its probabilities, and half of
it is masked away. Blocked attention takes the queries `block` rows at a time: the rows of
block i can only see keys 0 .. (i+1) * block, so that prefix is all it computes against.
The backward pass recomputes each block's probabilities from the saved log-sum-exp rather
than keeping them (the flash-attention recipe, with the query block as the tile). At seq
1024 and block 256 it does 10/16 of the dense work and never holds more than one block's
scores; on this CPU that is what decides the speed of a long-sequence step.

Numerics: scores, softmax and every accumulation are float32; with bfloat16 inputs the dots
read bfloat16 and accumulate in float32 (the CPU's bf16 dot units).

Layout: inside, everything is head-major ([batch, kv_heads, group, T, head_dim]), transposed
once on the way in and once on the way out. Every block's dots then batch over leading axes
and contract trailing ones, the form XLA:CPU runs without copying operands; time-major slices
cost a transpose per dot, forward and backward.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # a finite "minus infinity": a masked score whose exp is exactly 0


@functools.cache
def default_block() -> int:
    """Query rows per block where the config leaves it to the machine. Which size is fastest
    depends on the CPU, not the model: 64 on CPUs without AMX (an AMD EPYC with avx512_bf16
    ran tiny and small 1.04-1.05x faster in float32 than with 128, bfloat16 about even), 128
    on CPUs with AMX (a Xeon ran small 0.93x with 64) and on accelerators. The size changes
    how sums are ordered, not what is computed; a run's config can fix it (model.attention_block).
    """
    if jax.default_backend() != "cpu":
        return 128
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 128
    return 128 if " amx_bf16" in cpuinfo else 64


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _blocks(time: int, block: int) -> list[tuple[int, int]]:
    """(start, end) of each query block; its keys are 0 .. end."""
    return [(start, min(start + block, time)) for start in range(0, time, block)]


def _scores(
    q: jax.Array, k: jax.Array, segment_ids: jax.Array, start: int, end: int, scale: float
) -> jax.Array:
    """Masked float32 scores [batch, kv_heads, group, end - start, end] of queries start..end
    against keys 0..end: causal, and only within the query's own document."""
    s = _dot("bhgqd,bhkd->bhgqk", q[..., start:end, :], k[:, :, :end]) * scale
    rows = jnp.arange(start, end)[:, None]
    causal = rows >= jnp.arange(end)[None, :]
    same = segment_ids[:, start:end, None] == segment_ids[:, None, :end]
    return jnp.where((causal & same)[:, None, None], s, NEG_INF)


def _forward(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int
) -> tuple[jax.Array, jax.Array]:
    """Output [batch, kv_heads, group, T, head_dim] and log-sum-exp [batch, kv_heads, group, T]
    of head-major q [batch, kv_heads, group, T, head_dim], k and v [batch, kv_heads, T, d]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    outs, lses = [], []
    for start, end in _blocks(q.shape[3], block):
        s = _scores(q, k, segment_ids, start, end, scale)
        lse = jax.nn.logsumexp(s, axis=-1)
        p = jnp.exp(s - lse[..., None]).astype(v.dtype)
        outs.append(_dot("bhgqk,bhkd->bhgqd", p, v[:, :, :end]).astype(q.dtype))
        lses.append(lse)
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int
) -> jax.Array:
    return _forward(q, k, v, segment_ids, block)[0]


def _attention_fwd(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    out, lse = _forward(q, k, v, segment_ids, block)
    return out, (q, k, v, segment_ids, out, lse)


def _add_to_keys(
    total: jax.Array, rows: jax.Array, weights: jax.Array, end: int, transposed: bool
) -> jax.Array:
    """total plus weights [.., q, end] transposed times rows [.., q, d], summed over the query
    rows and groups, into keys 0..end of total ([.., T, d], or [.., d, T] when transposed)."""
    if transposed:
        return total.at[..., :end].add(_dot("bhgqd,bhgqk->bhdk", rows, weights))
    return total.at[:, :, :end].add(_dot("bhgqk,bhgqd->bhkd", weights, rows))


def _attention_bwd(
    block: int, residuals: tuple[jax.Array, ...], d_out: jax.Array
) -> tuple[jax.Array | None, ...]:
    q, k, v, segment_ids, out, lse = residuals
    scale = 1.0 / math.sqrt(q.shape[-1])
    time = q.shape[3]
    # delta = rowsum(dO * O): the softmax Jacobian's correction term, once for all blocks.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # like lse
    blocks = _blocks(time, block)
    # Over several blocks the key and value gradients are summed transposed, [.., head_dim, T]:
    # each block's product then transposes its small d_out or q block rather than the
    # probabilities (the gain is largest in float32 at long sequences). With one block XLA
    # folds the final transpose back into the product, and in bfloat16 it then has no kernel
    # to run it on.
    transposed = len(blocks) > 1
    dk = jnp.zeros((*k.shape[:2], k.shape[3], time) if transposed else k.shape, jnp.float32)
    dv = jnp.zeros_like(dk)
    dq_blocks = []
    for start, end in blocks:
        s = _scores(q, k, segment_ids, start, end, scale)
        p = jnp.exp(s - lse[..., start:end, None])
        d_o = d_out[..., start:end, :]
        dv = _add_to_keys(dv, d_o, p.astype(d_o.dtype), end, transposed)
        dp = _dot("bhgqd,bhkd->bhgqk", d_o, v[:, :, :end])
        ds = (p * (dp - delta[..., start:end, None]) * scale).astype(q.dtype)
        dq_blocks.append(_dot("bhgqk,bhkd->bhgqd", ds, k[:, :, :end]))
        dk = _add_to_keys(dk, q[..., start:end, :], ds, end, transposed)
    if transposed:
        dk, dv = jnp.swapaxes(dk, 2, 3), jnp.swapaxes(dv, 2, 3)
    dq = jnp.concatenate(dq_blocks, axis=3).astype(q.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int
) -> jax.Array:
    """Causal attention within packed documents: q [batch, T, heads, head_dim], k and v
    [batch, T, kv_heads, head_dim] (grouped-query: each kv head serves heads / kv_heads query
    heads), segment_ids [batch, T]. Returns [batch, T, heads, head_dim] in q's dtype."""
    batch, time, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(batch, time, kv_heads, heads // kv_heads, head_dim)
    q, k, v = grouped.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    out = _attention(q, k, v, segment_ids, block)  # [batch, kv_heads, group, T, head_dim]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, time, heads, head_dim)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[batch, 1, time, time]: causal, and only within the same packed document."""
    time = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((time, time), dtype=bool))
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal & same_segment)[:, None]
