import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdlm.model import ModelConfig, build, build_decoder, generate, init_cache, sample

CFG = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, seq_len=24, vocab_size=50)
MODEL = build(CFG)
# Jitted: one compile per shape instead of one per operation.
PARAMS = jax.jit(MODEL.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(3, 16)), jnp.int32)
full_forward = jax.jit(MODEL.apply)
sample_jitted = jax.jit(sample, static_argnames=("temperature", "top_k", "top_p"))


def test_cached_decoding_equals_the_full_forward_at_every_position() -> None:
    full = full_forward(PARAMS, None, TOKENS)
    decoder = build_decoder(CFG)
    step = jax.jit(lambda tokens, cache: decoder.apply(PARAMS, None, tokens, cache))
    prefill, cache = step(TOKENS[:, :5], init_cache(CFG, 3, 16))
    cached = [prefill]
    for t in range(5, 16):
        logits, cache = step(TOKENS[:, t : t + 1], cache)
        cached.append(logits)
    assert int(cache.length) == 16
    # float32 throughout; the two paths differ only in summation order.
    np.testing.assert_allclose(jnp.concatenate(cached, axis=1), full, atol=1e-5, rtol=1e-5)


def greedy_by_full_forward(prompt: jax.Array, steps: int) -> np.ndarray:
    """Each step reruns the full forward over every token so far, in a buffer of TOKENS' length
    so that it reuses one compile: the model is causal, so the zeros past the tokens so far
    never change their logits."""
    tokens = np.zeros((prompt.shape[0], TOKENS.shape[1]), np.int32)
    length = prompt.shape[1]
    tokens[:, :length] = prompt
    for _ in range(steps):
        logits = np.asarray(full_forward(PARAMS, None, jnp.asarray(tokens)))
        tokens[:, length] = np.argmax(logits[:, length - 1], axis=-1)
        length += 1
    return tokens[:, prompt.shape[1] : length]


def test_greedy_generation_matches_recomputing_everything() -> None:
    out = generate(
        PARAMS, TOKENS[:, :4], jax.random.PRNGKey(1), cfg=CFG, max_new_tokens=6, temperature=0.0
    )
    np.testing.assert_array_equal(out.tokens, greedy_by_full_forward(TOKENS[:, :4], 6))
    np.testing.assert_array_equal(out.lengths, [6, 6, 6])
    # top_k=1 and a tiny top_p both collapse sampling to greedy.
    for cut in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = generate(
            PARAMS, TOKENS[:, :4], jax.random.PRNGKey(2), cfg=CFG, max_new_tokens=6, **cut
        )
        np.testing.assert_array_equal(sampled.tokens, out.tokens)


def test_sampling_is_deterministic_for_a_key() -> None:
    def run(seed: int) -> jax.Array:
        key = jax.random.PRNGKey(seed)
        return generate(
            PARAMS, TOKENS[:, :4], key, cfg=CFG, max_new_tokens=8, temperature=2.0
        ).tokens

    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_generation_stops_at_the_end_token() -> None:
    greedy = generate(
        PARAMS, TOKENS[:, :4], jax.random.PRNGKey(0), cfg=CFG, max_new_tokens=6, temperature=0.0
    )
    end = int(greedy.tokens[0, 2])  # the first row produces this token at its third step
    out = generate(
        PARAMS,
        TOKENS[:, :4],
        jax.random.PRNGKey(0),
        cfg=CFG,
        max_new_tokens=6,
        temperature=0.0,
        end_token=end,
    )
    first_end = int(np.argmax(np.asarray(greedy.tokens[0]) == end))
    assert int(out.lengths[0]) == first_end + 1
    assert (np.asarray(out.tokens[0, first_end:]) == end).all()
    for row in range(3):  # every row is its greedy continuation up to and including its end
        n = int(out.lengths[row])
        np.testing.assert_array_equal(out.tokens[row, :n], greedy.tokens[row, :n])


def test_top_k_never_samples_outside_the_top_k() -> None:
    logits = jnp.asarray(np.random.default_rng(5).normal(size=(64, 50)), jnp.float32)
    allowed = jax.lax.top_k(logits, 3)[1]
    for seed in range(5):
        key = jax.random.PRNGKey(seed)
        tokens = sample_jitted(logits, key, temperature=1.0, top_k=3, top_p=1.0)
        assert (tokens[:, None] == allowed).any(axis=1).all()


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p() -> None:
    """Probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.6 keeps the first two (0.5 < 0.6 before the
    second, 0.8 >= 0.6 before the third), renormalised to 5:3; top_p=0.9 keeps three."""
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(np.tile(probs, (4000, 1))), jnp.float32)
    for top_p, kept in ((0.6, 2), (0.9, 3)):
        tokens = np.asarray(sample_jitted(logits, jax.random.PRNGKey(7), 1.0, None, top_p))
        counts = np.bincount(tokens, minlength=4)
        assert counts[kept:].sum() == 0 and (counts[:kept] > 0).all()
        expected = probs[:kept] / probs[:kept].sum() * len(tokens)
        assert np.abs(counts[:kept] - expected).max() < 0.05 * len(tokens), counts


def test_too_long_a_request_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="exceeds the model's seq_len"):
        generate(PARAMS, TOKENS[:, :4], jax.random.PRNGKey(0), cfg=CFG, max_new_tokens=30)
