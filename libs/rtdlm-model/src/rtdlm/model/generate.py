"""Autoregressive generation with a KV cache: prefill the prompt once, then one token a step."""

from __future__ import annotations

import functools
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from rtdlm.model.config import ModelConfig
from rtdlm.model.transformer import build_decoder, init_cache


class Generation(NamedTuple):
    tokens: jax.Array  # [batch, max_new_tokens]; after an end token, end tokens
    lengths: jax.Array  # [batch]: tokens generated, the end token included


def sample(
    logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None, top_p: float
) -> jax.Array:
    """One token per row of logits [batch, vocab]: greedy at temperature 0, else sampled from
    the temperature-scaled distribution cut to the top_k tokens and the top_p probability mass."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # keep a token while mass before it < p
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1)
        logits = jnp.where(logits < cutoff[:, None], -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "end_token"),
)
def generate(
    params: hk.Params,
    prompt: jax.Array,
    key: jax.Array,
    *,
    cfg: ModelConfig,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    end_token: int | None = None,
) -> Generation:
    """Continues each prompt row [batch, prompt_len] until end_token or max_new_tokens."""
    batch, prompt_len = prompt.shape
    if prompt_len + max_new_tokens > cfg.seq_len:
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"seq_len ({cfg.seq_len})"
        )
    decoder = build_decoder(cfg)
    logits, cache = decoder.apply(
        params, None, prompt, init_cache(cfg, batch, prompt_len + max_new_tokens)
    )
    fill = 0 if end_token is None else end_token

    def not_finished(carry: tuple) -> jax.Array:
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_token(carry: tuple) -> tuple:
        step, last_logits, cache, tokens, done, key = carry
        key, sample_key = jax.random.split(key)
        token = jnp.where(done, fill, sample(last_logits, sample_key, temperature, top_k, top_p))
        tokens = tokens.at[:, step].set(token)
        done = done | (token == end_token) if end_token is not None else done
        logits, cache = decoder.apply(params, None, token[:, None], cache)
        return step + 1, logits[:, -1], cache, tokens, done, key

    start = (
        jnp.zeros((), jnp.int32),
        logits[:, -1],
        cache,
        jnp.full((batch, max_new_tokens), fill, jnp.int32),
        jnp.zeros((batch,), bool),
        key,
    )
    steps, _, _, tokens, _, _ = jax.lax.while_loop(not_finished, one_token, start)
    if end_token is None:
        lengths = jnp.full((batch,), steps)
    else:
        is_end = tokens == end_token
        lengths = jnp.where(is_end.any(axis=1), jnp.argmax(is_end, axis=1) + 1, max_new_tokens)
    return Generation(tokens, lengths)
