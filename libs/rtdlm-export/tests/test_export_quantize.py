import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rtdlm.export import (
    dequantize_params,
    dequantize_tensor,
    nbytes,
    quantize_params,
    quantize_tensor,
)

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


def test_stacked_norm_scales_stay_float32() -> None:
    rng = np.random.default_rng(2)
    params = {
        "layers/block/attn_norm": {"scale": rng.normal(size=(4, 32)).astype(np.float32)},
        "layers/block/attn/query": {"w": rng.normal(size=(4, 32, 32)).astype(np.float32)},
    }
    quantized = quantize_params(params)
    norm = quantized["layers/block/attn_norm"]["scale"]
    np.testing.assert_array_equal(norm, params["layers/block/attn_norm"]["scale"])
    assert quantized["layers/block/attn/query"]["w"].scale.shape == (4, 1, 32)


def test_params_keep_vectors_and_shrink_matrices() -> None:
    rng = np.random.default_rng(0)
    params = {
        "linear": {"w": rng.normal(size=(64, 32)).astype(np.float32), "b": np.ones(32, np.float32)}
    }
    quantized = quantize_params(params)
    np.testing.assert_array_equal(quantized["linear"]["b"], params["linear"]["b"])
    assert nbytes(quantized) < nbytes(params) / 3
    restored = dequantize_params(quantized)
    np.testing.assert_allclose(restored["linear"]["w"], params["linear"]["w"], atol=0.05)


def test_all_zero_channel_is_exact() -> None:
    w = np.zeros((3, 2), np.float32)
    np.testing.assert_array_equal(dequantize_tensor(quantize_tensor(w)), w)
