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
@given(arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 8)), elements=finite))
def test_error_is_at_most_half_a_step_per_channel(w: np.ndarray) -> None:
    q = quantize_tensor(w)
    assert q.values.dtype == np.int8 and q.scale.shape == (1, w.shape[1])
    error = np.abs(dequantize_tensor(q) - w)
    assert (error <= q.scale / 2 + 1e-6 * np.abs(w).max(initial=1.0)).all()


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
