from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtdlm.model import ModelConfig, build, count_params, preset
from rtdlm.model.linear import swiglu
from rtdlm.model.transformer import apply_rotary, rms_norm, rotary_angles

SMALL = ModelConfig(
    d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=16, vocab_size=64
)


def init_and_apply(
    cfg: ModelConfig, tokens: jax.Array, segment_ids: jax.Array | None = None
) -> tuple[hk.Params, jax.Array]:
    """Jitted, as training runs it: one compile per shape instead of one per operation."""
    model = build(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
    return params, jax.jit(model.apply)(params, None, tokens, segment_ids)


@st.composite
def configs(draw: st.DrawFn) -> ModelConfig:
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    return ModelConfig(
        d_model=heads * draw(st.sampled_from([2, 4, 8])),
        num_layers=draw(st.integers(1, 2)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        seq_len=8,
        vocab_size=draw(st.integers(2, 50)),
        d_ff=draw(st.none() | st.integers(1, 16)),
        tie_embeddings=draw(st.booleans()),
        compute_dtype=draw(st.sampled_from(["float32", "bfloat16"])),
    )


@settings(max_examples=8, deadline=None)
@given(cfg=configs(), batch=st.integers(1, 3), time=st.integers(1, 8))
def test_shapes_and_dtypes_over_random_configs(cfg: ModelConfig, batch: int, time: int) -> None:
    tokens = jnp.zeros((batch, time), jnp.int32)
    params, logits = init_and_apply(cfg, tokens)
    assert logits.shape == (batch, time, cfg.vocab_size)
    assert logits.dtype == jnp.float32  # even when computing in bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    assert jnp.isfinite(logits).all()


SMALL_MODEL = build(SMALL)
SMALL_PARAMS = SMALL_MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
small_logits = jax.jit(lambda tokens: SMALL_MODEL.apply(SMALL_PARAMS, None, tokens))


@settings(max_examples=20, deadline=None)
@given(t=st.integers(min_value=0, max_value=14), seed=st.integers(0, 2**16))
def test_future_tokens_never_change_past_logits(t: int, seed: int) -> None:
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 64, size=(1, 16)), jnp.int32)
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 1) % 64)
    before, after = small_logits(tokens), small_logits(changed)
    np.testing.assert_allclose(before[:, : t + 1], after[:, : t + 1], atol=1e-5)
    assert not np.allclose(before[:, t + 1 :], after[:, t + 1 :])


def test_packed_documents_do_not_see_each_other() -> None:
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 64, size=(1, 6)), rng.integers(0, 64, size=(1, 10))
    packed = jnp.asarray(np.concatenate([first, second], 1), jnp.int32)
    segments = jnp.asarray([[1] * 6 + [2] * 10])
    _, logits = init_and_apply(SMALL, packed, segments)
    # The second document alone, at positions 0..9, gives the same logits as inside the pack.
    _, alone = init_and_apply(SMALL, jnp.asarray(second, jnp.int32))
    np.testing.assert_allclose(logits[:, 6:], alone, atol=1e-5)
    # Changing the first document never changes the second document's logits.
    other = packed.at[:, :6].set((packed[:, :6] + 7) % 64)
    _, logits_other = init_and_apply(SMALL, other, segments)
    np.testing.assert_allclose(logits[:, 6:], logits_other[:, 6:], atol=1e-5)
    assert not np.allclose(logits[:, :6], logits_other[:, :6])


@settings(max_examples=20, deadline=None)
@given(
    time=st.integers(1, 64),
    head_dim=st.sampled_from([8, 32, 64]),
    seed=st.integers(0, 2**16),
)
def test_rotary_table_gives_the_angles_computed_per_position(
    time: int, head_dim: int, seed: int
) -> None:
    # Training looks cos/sin up in a constant table; decoding computes them per position.
    positions = jnp.asarray(np.random.default_rng(seed).integers(0, time, size=(2, time)))
    direct = jax.jit(lambda p: rotary_angles(p, head_dim, 10000.0))(positions)
    looked_up = jax.jit(lambda p: rotary_angles(p, head_dim, 10000.0, time))(positions)
    for a, b in zip(direct, looked_up, strict=True):
        assert a.shape == b.shape == (2, time, 1, head_dim // 2)
        np.testing.assert_allclose(a, b, atol=1e-6)


def assert_vjps_close(
    f: Callable[..., jax.Array],
    reference: Callable[..., jax.Array],
    primals: tuple[Any, ...],
    cotangent: jax.Array,
    tol: float,
) -> None:
    """f and reference agree in value and in every gradient, gradient dtypes included; each
    side's value and gradients are one jitted computation. The absolute tolerance is in units
    of the tensor's largest element: an element summed from large terms (a weight's gradient
    over the batch) carries their rounding error, however small it ends up."""

    def value_and_vjp(fn: Callable[..., jax.Array]) -> tuple[jax.Array, Any]:
        out, pull = jax.vjp(fn, *primals)
        return out, pull(cotangent)

    def assert_close(a: jax.Array, b: jax.Array) -> None:
        actual, desired = np.float32(a), np.float32(b)
        scale = max(1.0, float(np.abs(desired).max(initial=0.0)))
        np.testing.assert_allclose(actual, desired, rtol=tol, atol=tol * scale)

    got, want = jax.jit(lambda: value_and_vjp(f))(), jax.jit(lambda: value_and_vjp(reference))()
    assert_close(got[0], want[0])
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        assert a.dtype == b.dtype
        assert_close(a, b)


@settings(max_examples=8, deadline=None)
@given(
    dtype=st.sampled_from(["float32", "bfloat16"]),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 3)),
    half=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_written_out_gradients_match_autodiff(
    dtype: str, shape: tuple[int, int, int], half: int, seed: int
) -> None:
    # RMSNorm and the rotation carry their own VJPs; autodiff of the plain formulas
    # (hk.RMSNorm's, the rotation's) is the reference, in either compute dtype.
    rng = np.random.default_rng(seed)
    batch, time, heads = shape
    x = jnp.asarray(rng.normal(size=(batch, time, heads, 2 * half)), dtype)
    g = jnp.asarray(rng.normal(size=x.shape), dtype)
    cfg = ModelConfig(d_model=2 * half, num_heads=1, num_kv_heads=1, num_layers=1, seq_len=8)
    rotary = rotary_angles(jnp.asarray(rng.integers(0, 64, (batch, time))), 2 * half, 10000.0)

    def plain_rotary(x: jax.Array) -> jax.Array:
        x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
        cos, sin = rotary
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)

    def plain_norm(x: jax.Array) -> jax.Array:
        norm = hk.RMSNorm(axis=-1, eps=cfg.norm_eps, name="norm")
        return norm(x.astype(jnp.float32)).astype(x.dtype)

    ours = hk.transform(lambda x: rms_norm(x, cfg, "norm"))
    theirs = hk.transform(plain_norm)
    scale = {"norm": {"scale": jnp.asarray(rng.normal(size=(2 * half,)), jnp.float32)}}
    tol = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    for f, reference, argument in (
        (lambda a: apply_rotary(a, rotary), plain_rotary, x),
        (lambda p: ours.apply(p, None, x), lambda p: theirs.apply(p, None, x), scale),
        (lambda a: ours.apply(scale, None, a), lambda a: theirs.apply(scale, None, a), x),
    ):
        assert_vjps_close(f, reference, (argument,), g, tol)


@settings(max_examples=8, deadline=None)
@given(
    dtype=st.sampled_from(["float32", "bfloat16"]),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 24)),
    size=st.integers(1, 24),
    seed=st.integers(0, 2**16),
)
def test_swiglu_and_its_gradient_are_the_plain_formulas(
    dtype: str, shape: tuple[int, int, int], size: int, seed: int
) -> None:
    # One pass each way over the joint gate/up product, against autodiff of
    # silu(x @ w_gate) * (x @ w_up) computed in float32, for x and both weights.
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape), dtype)
    g = jnp.asarray(rng.normal(size=(*shape[:-1], size)), dtype)
    params = {
        name: {"w": jnp.asarray(rng.normal(size=(shape[-1], size)) / np.sqrt(shape[-1]), dtype)}
        for name in ("gate", "up")
    }
    ours = hk.transform(lambda x: swiglu(x, size))

    def plain(p: hk.Params, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        gate, up = (x32 @ p[name]["w"].astype(jnp.float32) for name in ("gate", "up"))
        return (jax.nn.silu(gate) * up).astype(x.dtype)

    tol = {"float32": 1e-5, "bfloat16": 3e-2}[dtype]
    assert_vjps_close(lambda p, x: ours.apply(p, None, x), plain, (params, x), g, tol)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_changes_memory_not_results(remat: str) -> None:
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, size=(2, 16)), jnp.int32)
    plain, checkpointed = build(SMALL), build(ModelConfig(**{**SMALL.__dict__, "remat": remat}))
    params = jax.jit(plain.init)(jax.random.PRNGKey(0), tokens)

    def loss(model: hk.Transformed, p: hk.Params) -> jax.Array:
        return model.apply(p, None, tokens).mean()

    grads = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
    grads_remat = jax.jit(jax.grad(lambda p: loss(checkpointed, p)))(params)
    for a, b in zip(
        jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_remat), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_same_seed_same_parameters_bit_for_bit() -> None:
    tokens = jnp.zeros((1, 16), jnp.int32)
    first, _ = init_and_apply(SMALL, tokens)
    again, _ = init_and_apply(SMALL, tokens)
    assert count_params(first) == count_params(again)
    for a, b in zip(
        jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again), strict=True
    ):
        assert np.array_equal(a, b)


def test_preset_overrides_and_errors() -> None:
    assert preset("tiny", vocab_size=512).vocab_size == 512
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown model field"):
        preset("tiny", widht=3)
    with pytest.raises(ValueError, match="num_heads"):
        preset("tiny", num_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        preset("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="model.d_model must be positive, got 0"):
        preset("tiny", d_model=0)
    with pytest.raises(ValueError, match="must be even for rotary"):
        preset("tiny", d_model=12, num_heads=4, num_kv_heads=4)
    with pytest.raises(ValueError, match="model.remat must be one of none, full, dots_saveable"):
        preset("tiny", remat="some")
