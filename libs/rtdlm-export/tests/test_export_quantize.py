import functools
from dataclasses import replace

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rtdlm.export.quantize import (
    dequantize,
    dequantize_tensor,
    is_quantized,
    nbytes,
    quantize,
    quantize_tensor,
)
from rtdlm.model import ModelConfig, build, generate

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=50, deadline=None)
@given(
    arrays(
        np.float32, st.lists(st.integers(1, 6), min_size=2, max_size=4).map(tuple), elements=finite
    )
)
def test_error_is_at_most_half_a_step_per_channel(w: np.ndarray) -> None:
    q = quantize_tensor(w)
    assert q.values.dtype == np.int8 and q.scale.shape == (*w.shape[:-2], 1, w.shape[-1])
    error = np.abs(dequantize_tensor(q) - w)
    assert (error <= q.scale / 2 + 1e-6 * np.abs(w).max(initial=1.0)).all()


def test_stacked_weights_get_a_scale_per_layer_and_channel() -> None:
    """[layers, in, out] from scan_layers (and [layers, experts, in, out] for MoE): each
    layer is quantized exactly as it would be alone, however small it is beside the others."""
    rng = np.random.default_rng(1)
    magnitudes = np.array([1e-3, 1.0, 1e2], np.float32)[:, None, None]
    w = rng.normal(size=(3, 16, 8)).astype(np.float32) * magnitudes
    q = quantize_tensor(w)
    assert q.scale.shape == (3, 1, 8)
    for layer in range(3):
        alone = quantize_tensor(w[layer])
        np.testing.assert_array_equal(q.values[layer], alone.values)
        np.testing.assert_array_equal(q.scale[layer], alone.scale)
    relative = np.abs(dequantize_tensor(q) - w).max(axis=(1, 2)) / np.abs(w).max(axis=(1, 2))
    assert (relative <= 0.5 / 127 + 1e-6).all()  # the 1e-3 layer as good as the 1e2 one
    experts = quantize_tensor(rng.normal(size=(2, 4, 16, 8)).astype(np.float32))
    assert experts.scale.shape == (2, 4, 1, 8)


def test_all_zero_channel_is_exact() -> None:
    w = np.zeros((3, 2), np.float32)
    np.testing.assert_array_equal(dequantize_tensor(quantize_tensor(w)), w)


def test_a_channel_of_subnormals_quantizes_to_zeros_without_warnings() -> None:
    """max_abs / 127 underflows to 0 for the tiniest subnormals: no division by it."""
    w = np.array([[1e-45, 0.5], [-1e-45, -0.25]], np.float32)  # channel 0: the smallest subnormal
    with np.errstate(divide="raise", invalid="raise"):
        q = quantize_tensor(w)
    np.testing.assert_array_equal(q.values[:, 0], [0, 0])
    assert np.isfinite(dequantize_tensor(q)).all()
    assert np.abs(dequantize_tensor(q) - w)[:, 1].max() <= q.scale[0, 1] / 2


DENSE = ModelConfig(
    d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=16, vocab_size=64
)
CONFIGS = {
    "dense, tied": DENSE,
    "dense, untied": replace(DENSE, tie_embeddings=False),
    "scanned": replace(DENSE, num_layers=3, scan_layers=True),
    "moe, scanned": replace(DENSE, num_layers=4, moe_every=2, num_experts=4, scan_layers=True),
}


@functools.cache
def init(cfg: ModelConfig) -> hk.Params:
    """Jitted (one compile, not one per operation) and once per config: tests only read it."""
    params = jax.jit(build(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    return jax.tree_util.tree_map(np.asarray, params)


def test_matrices_become_int8_with_a_scale_and_the_rest_stays_float32() -> None:
    params = init(CONFIGS["moe, scanned"])
    quantized = quantize(params)
    query = quantized["layers/block_0/attn/query"]
    assert query["w"].dtype == np.int8 and query["w_scale"].shape == (2, 1, 32)  # per layer
    moe = quantized["layers/block_1/moe"]
    assert moe["w_gate"].dtype == np.int8 and moe["w_gate_scale"].shape == (2, 4, 1, 256)
    embed = quantized["embed"]  # a scale per vocabulary row: lookup and tied logits share it
    assert embed["embeddings"].dtype == np.int8 and embed["embeddings_scale"].shape == (64, 1)
    np.testing.assert_array_equal(
        quantized["layers/block_1/moe/router"]["w"], params["layers/block_1/moe/router"]["w"]
    )
    norm = quantized["layers/block_0/attn_norm"]["scale"]
    assert norm.dtype == np.float32 and norm.shape == (2, 32)
    assert nbytes(quantized) < nbytes(params) / 3 and is_quantized(quantized)
    assert not is_quantized(dequantize(quantized))
    restored = dequantize(quantized)
    assert {m: sorted(v) for m, v in restored.items()} == {m: sorted(v) for m, v in params.items()}
    assert quantize(quantized)["embed"]["embeddings"].dtype == np.int8  # idempotent


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_model_runs_int8_parameters_as_their_float_values(name: str) -> None:
    """rtdlm.model computes (x @ values) * scale: the dequantized float model's logits, up to
    float rounding, for every layout, and generation with the KV cache works on them."""
    cfg = CONFIGS[name]
    quantized = quantize(init(cfg))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    apply = jax.jit(build(cfg).apply)  # one compile per parameter layout, not per operation
    int8_logits = apply(quantized, None, tokens)
    float_logits = apply(dequantize(quantized), None, tokens)
    np.testing.assert_allclose(int8_logits, float_logits, atol=1e-4)
    key = jax.random.PRNGKey(1)
    a = generate(quantized, tokens[:, :4], key, cfg=cfg, max_new_tokens=8, temperature=0.0)
    b = generate(
        dequantize(quantized), tokens[:, :4], key, cfg=cfg, max_new_tokens=8, temperature=0.0
    )
    np.testing.assert_array_equal(a.tokens, b.tokens)
