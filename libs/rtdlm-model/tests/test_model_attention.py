import dataclasses
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import haiku as hk
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtdlm.model import ModelConfig, build
from rtdlm.model.attention import blocked_causal_attention, default_block
from rtdlm.model.linear import dot

SMALL = ModelConfig(
    d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=16, vocab_size=64
)


def packed_segments(rng: np.random.Generator, batch: int, time: int) -> np.ndarray:
    """Rows of documents 1, 2, ... of random lengths, some ending in padding (0)."""
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, time + 1), size=rng.integers(1, 4)))
        ids = np.searchsorted(cuts, np.arange(time), side="right") + 1
        ids[ids > len(cuts)] = 0  # after the last document: padding
        rows.append(ids)
    return np.stack(rows).astype(np.int32)


Attention = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def dense_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array
) -> jax.Array:
    """The reference, written out: softmax(q k^T / sqrt(d)) v over the keys at or before each
    query and in its document; query heads h*G .. h*G+G-1 share kv head h."""
    group, time = q.shape[2] // k.shape[2], q.shape[1]
    k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    causal = np.tril(np.ones((time, time), bool))
    same_document = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    scores = jnp.where(causal & same_document, scores, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def qkv(
    seed: int, batch: int, time: int, heads: int, kv_heads: int, head_dim: int, dtype: Any
) -> list[np.ndarray]:
    # Drawn by numpy: jax.random compiles a program per shape, each slower than the test.
    rng = np.random.default_rng(seed)
    shapes = [(batch, time, heads, head_dim)] + [(batch, time, kv_heads, head_dim)] * 2
    return [rng.normal(size=s).astype(np.float32).astype(dtype) for s in shapes]


def squared_sum(attention: Attention) -> Attention:
    return lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32) ** 2)


def squared_sum_value_and_grads(
    attention: Attention, q: jax.Array, k: jax.Array, v: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """attention(q, k, v) and the gradients of its squared sum, for one jitted computation."""
    return attention(q, k, v), jax.grad(squared_sum(attention), argnums=(0, 1, 2))(q, k, v)


@jax.jit
def dense_value_and_grads(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    def dense(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return dense_causal_attention(q, k, v, segment_ids)

    return squared_sum_value_and_grads(dense, q, k, v)


@functools.partial(jax.jit, static_argnames="block")
def blocked_value_and_grads(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, block: int
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    def blocked(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return blocked_causal_attention(q, k, v, segment_ids, block)

    return squared_sum_value_and_grads(blocked, q, k, v)


@settings(max_examples=8, deadline=None)
@given(
    batch=st.integers(1, 2),
    time=st.integers(1, 33),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    head_dim=st.sampled_from([2, 8]),
    block=st.integers(4, 40),
    seed=st.integers(0, 2**16),
)
def test_blocked_attention_matches_dense_values_and_gradients(
    batch: int, time: int, kv_heads: int, group: int, head_dim: int, block: int, seed: int
) -> None:
    q, k, v = qkv(seed, batch, time, kv_heads * group, kv_heads, head_dim, jnp.float32)
    segments = jnp.asarray(packed_segments(np.random.default_rng(seed), batch, time))
    out, grads = blocked_value_and_grads(q, k, v, segments, block)
    expected_out, expected = dense_value_and_grads(q, k, v, segments)
    np.testing.assert_allclose(out, expected_out, atol=2e-6, rtol=2e-5)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-4)


BFLOAT16_QKV = qkv(0, 2, 64, 4, 2, 64, jnp.bfloat16)
BFLOAT16_SEGMENTS = jnp.asarray(packed_segments(np.random.default_rng(0), 2, 64))


@functools.cache
def float32_reference() -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Dense attention and its gradients on BFLOAT16_QKV's values in float32, shared by every
    block size."""
    f32 = [a.astype(jnp.float32) for a in BFLOAT16_QKV]
    return dense_value_and_grads(*f32, BFLOAT16_SEGMENTS)


@pytest.mark.parametrize("block", [16, 32, 64])  # four query blocks, two, one
def test_blocked_attention_in_bfloat16_stays_close_to_float32(block: int) -> None:
    out, grads = blocked_value_and_grads(*BFLOAT16_QKV, BFLOAT16_SEGMENTS, block)
    reference, expected = float32_reference()
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), reference, atol=3e-2)
    for got, want in zip(grads, expected, strict=True):
        assert got.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(want)))
        assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) < 0.03 * scale


def test_model_logits_and_gradients_are_the_same_blocked_or_dense() -> None:
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, SMALL.vocab_size, (2, SMALL.seq_len)).astype(np.int32)
    segments = jnp.asarray(packed_segments(rng, 2, SMALL.seq_len))
    blocked = build(dataclasses.replace(SMALL, attention="blocked", attention_block=4))
    dense = build(dataclasses.replace(SMALL, attention="xla"))
    params = jax.jit(blocked.init)(jax.random.PRNGKey(0), tokens)

    @functools.partial(jax.jit, static_argnums=0)
    def logits_and_grads(
        model: hk.Transformed, params: hk.Params
    ) -> tuple[jax.Array, jax.Array, hk.Params]:
        """Logits unpacked and packed, and the packed loss's gradients: one compile a model."""

        def loss(p: hk.Params) -> tuple[jax.Array, jax.Array]:
            logits = model.apply(p, None, tokens, segments)
            return jnp.mean(logits**2), logits

        grads, packed = jax.grad(loss, has_aux=True)(params)
        return model.apply(params, None, tokens), packed, grads

    *got_logits, got = logits_and_grads(blocked, params)
    *want_logits, want = logits_and_grads(dense, params)
    for a, b in zip(got_logits, want_logits, strict=True):  # segment_ids None, then packed
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def dot_operand_dtypes(fn: Callable[..., Any], *args: Any) -> set[tuple[str, ...]]:
    """The (lhs, rhs) dtypes of every matrix product in fn's jaxpr, nested calls included.

    A dot against a vector is a sum (RMSNorm's scale gradient, kept in float32), not one."""
    found: set[tuple[str, ...]] = set()

    def visit(jaxpr: Any) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and min(v.aval.ndim for v in eqn.invars) > 1:
                found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_every_training_dot_in_bfloat16_reads_bfloat16() -> None:
    """Forward and backward: a float32 operand would send the dot to the slower f32 kernel."""
    cfg = dataclasses.replace(SMALL, compute_dtype="bfloat16", attention_block=4)
    model = build(cfg)
    tokens = jnp.zeros((2, cfg.seq_len), jnp.int32)
    # The jaxpr depends on the parameters' shapes and dtypes only: no need to compute them.
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    segments = jnp.ones_like(tokens)
    grad = jax.grad(lambda p: jnp.mean(model.apply(p, None, tokens, segments)))
    assert dot_operand_dtypes(grad, params) == {("bfloat16", "bfloat16")}


def sin_loss(product: Callable[..., jax.Array], x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.sum(jnp.sin(product(x, w).astype(jnp.float32)))


# Jitted once for the module: each new shape or dtype compiles once, not once per operation.
dot_grads = jax.jit(jax.grad(functools.partial(sin_loss, dot), (0, 1)))
jnp_dot_grads = jax.jit(jax.grad(functools.partial(sin_loss, jnp.dot), (0, 1)))


def test_low_precision_dot_gradients_follow_float32() -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 16)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(16, 8)).astype(np.float32))
    dx, dw = dot_grads(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    want_dx, want_dw = dot_grads(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(dx.astype(jnp.float32), want_dx, atol=0.15)
    np.testing.assert_allclose(dw.astype(jnp.float32), want_dw, atol=0.3)
    assert dot(x, w).dtype == jnp.float32  # float32's forward stays the plain, exact jnp.dot
    np.testing.assert_array_equal(dot(x, w), jnp.dot(x, w))


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([(8, 24), (24, 8), (16, 16)]), st.integers(0, 2**16))
def test_float32_dot_gradients_are_autodiffs(sizes: tuple[int, int], seed: int) -> None:
    """The written-out weight gradient (either operand transposed) is autodiff's x.T @ g."""
    d_in, d_out = sizes
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 5, d_in)).astype(np.float32)
    w = rng.normal(size=(d_in, d_out)).astype(np.float32)
    for g, e in zip(dot_grads(x, w), jnp_dot_grads(x, w), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def compiled_dot_operand_dtypes(hlo: str) -> set[str]:
    """The element types every dot of a compiled HLO module reads, fused or not."""
    found = set()
    for computation in hlo.split("\n}"):
        types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", computation))
        for operands in re.findall(r" dot\(([^)]*)\)", computation):
            found |= {types[name] for name in re.findall(r"%([\w.\-]+)", operands)}
    return found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradient_dots_stay_on_the_fast_cpu_kernels(dtype: str) -> None:
    """XLA:CPU runs a dot contracting both operands' major axis (autodiff's x.T @ g) on a slow
    generic kernel, after a transpose of its own and, in bfloat16, a conversion of both operands
    to float32: the compiled gradient has no such dot, and every dot reads the compute dtype."""
    for d_in, d_out in [(32, 48), (48, 32)]:
        x, w = jnp.ones((64, d_in), dtype), jnp.ones((d_in, d_out), dtype)
        loss = lambda x, w: jnp.sum(jnp.sin(dot(x, w).astype(jnp.float32)))  # noqa: E731
        hlo = str(jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile().as_text())
        assert hlo.count(" dot(") == 3  # forward, dx, dw
        assert "lhs_contracting_dims={0}" not in hlo
        assert compiled_dot_operand_dtypes(hlo) == {"f32" if dtype == "float32" else "bf16"}


def test_an_unset_block_is_the_machines_and_computes_as_that_block_does() -> None:
    has_amx = " amx_bf16" in Path("/proc/cpuinfo").read_text()
    assert default_block() == (128 if has_amx else 64)
    cfg = dataclasses.replace(SMALL, seq_len=160)  # longer than either block
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, cfg.seq_len))
    unset, fixed = build(cfg), build(dataclasses.replace(cfg, attention_block=default_block()))
    params = unset.init(jax.random.PRNGKey(0), tokens)
    np.testing.assert_array_equal(
        unset.apply(params, None, tokens), fixed.apply(params, None, tokens)
    )
    with pytest.raises(ValueError, match="model.attention_block must be positive"):
        dataclasses.replace(cfg, attention_block=0)
