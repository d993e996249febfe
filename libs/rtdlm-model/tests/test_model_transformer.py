import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtdlm.model import ModelConfig, build, param_count, preset

SMALL = ModelConfig(
    d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=16, vocab_size=64
)


def test_logits_shape_and_dtype() -> None:
    model = build(SMALL)
    tokens = jnp.zeros((3, 16), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), tokens)
    logits = model.apply(params, None, tokens)
    assert logits.shape == (3, 16, 64)
    assert logits.dtype == jnp.float32
    assert param_count(params) > 0


@settings(max_examples=10, deadline=None)
@given(t=st.integers(min_value=0, max_value=14), seed=st.integers(0, 2**16))
def test_future_tokens_never_change_past_logits(t: int, seed: int) -> None:
    model = build(SMALL)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 64, size=(1, 16)), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), tokens)
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 1) % 64)
    before = model.apply(params, None, tokens)[:, : t + 1]
    after = model.apply(params, None, changed)[:, : t + 1]
    np.testing.assert_allclose(before, after, atol=1e-5)


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
