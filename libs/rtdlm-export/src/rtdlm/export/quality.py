"""How good an exported model is: held-out perplexity and greedy generations, measured the same
way for every runtime (JAX float32, JAX INT8, ONNX Runtime float32 and INT8)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rtdlm.export.artifact import CheckFailed, ExportError
from rtdlm.export.quantize import Params
from rtdlm.model import ModelConfig, build, generate

Logits = Callable[[np.ndarray], np.ndarray]  # tokens [batch, time] -> logits [batch, time, vocab]


class Perplexity(NamedTuple):
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def windows(documents: Iterable[np.ndarray], seq_len: int, max_tokens: int) -> np.ndarray:
    """Rows [n, seq_len + 1] of consecutive held-out tokens (documents in order, joined), about
    max_tokens predicted tokens in all. Plain causal rows: every runtime scores them alike."""
    width, rows = seq_len + 1, max(1, max_tokens // seq_len)
    parts, have = [], 0
    for document in documents:
        parts.append(np.asarray(document, np.int64))
        have += len(document)
        if have >= rows * width:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    rows = min(rows, len(stream) // width)
    if rows < 1:
        raise ExportError(
            f"the held-out data has {len(stream):,} tokens, fewer than one row of {width}: "
            "evaluate on more data"
        )
    return stream[: rows * width].reshape(rows, width)


def eval_batch_size(cfg: ModelConfig) -> int:
    """Rows per evaluation batch: logits of at most 16M floats, at most 16 rows."""
    return max(1, min(16, 2**24 // (cfg.seq_len * cfg.vocab_size)))


def perplexity(logits: Logits, rows: np.ndarray, batch_size: int) -> Perplexity:
    """Mean next-token NLL of `rows` under `logits`, computed in float64 on the host."""
    total = 0.0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        scores = np.asarray(logits(batch[:, :-1]), np.float64)
        scores -= scores.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(scores).sum(axis=-1))
        picked = np.take_along_axis(scores, batch[:, 1:, None], axis=-1)[..., 0]
        total += float((log_z - picked).sum())
    count = rows.shape[0] * (rows.shape[1] - 1)
    return Perplexity(total / count, count)


@dataclass(frozen=True)
class Comparison:
    """An exported model beside float32 JAX: perplexity on the same held-out rows, and greedy
    continuations [1, n] of the same held-out prompt."""

    reference: Perplexity  # JAX float32
    measured: Perplexity
    greedy_reference: np.ndarray
    greedy_measured: np.ndarray

    @property
    def increase(self) -> float:
        """Relative perplexity increase over float32 (0.01: 1% worse)."""
        return self.measured.perplexity / self.reference.perplexity - 1.0

    @property
    def greedy_agreement(self) -> int:
        """How many leading greedy tokens the two share."""
        a, b = self.greedy_reference.ravel(), self.greedy_measured.ravel()
        differ = np.flatnonzero(a != b)
        return int(differ[0]) if len(differ) else int(a.size)

    def check(self, label: str, limit: float) -> None:
        """Raises CheckFailed with both numbers when perplexity rose by more than `limit`."""
        if self.increase > limit:
            raise CheckFailed(
                f"{label} held-out perplexity {self.measured.perplexity:.4f} is "
                f"{self.increase:.2%} above float32's {self.reference.perplexity:.4f} (limit "
                f"{limit:.2%}); nothing was written: raise --max-ppl-increase to accept it"
            )

    def as_json(self) -> dict[str, Any]:
        return {
            "eval_tokens": self.measured.tokens,
            "perplexity_float32": self.reference.perplexity,
            "perplexity": self.measured.perplexity,
            "perplexity_increase": self.increase,
            "greedy_tokens": int(self.greedy_reference.size),
            "greedy_agreement": self.greedy_agreement,
        }


def jax_logits(cfg: ModelConfig, params: Params) -> Logits:
    """The JAX model's logits, float or INT8 parameters alike."""
    apply = _jitted_apply(cfg)
    return lambda tokens: np.asarray(apply(params, None, jnp.asarray(tokens, jnp.int32)))


@functools.cache
def _jitted_apply(cfg: ModelConfig) -> Callable[..., jax.Array]:
    """One jitted forward per config, so each check of an export reuses its compiles."""
    return jax.jit(build(cfg).apply)


def jax_perplexity(cfg: ModelConfig, params: Params, rows: np.ndarray) -> Perplexity:
    return perplexity(jax_logits(cfg, params), rows, eval_batch_size(cfg))


def jax_greedy(cfg: ModelConfig, params: Params, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """rtdlm.model.generate at temperature 0: the tokens [batch, new_tokens]."""
    out = generate(
        params,
        jnp.asarray(prompt, jnp.int32),
        jax.random.PRNGKey(0),
        cfg=cfg,
        max_new_tokens=new_tokens,
        temperature=0.0,
    )
    return np.asarray(out.tokens)


class Reference(NamedTuple):
    """The float32 JAX model on the held-out rows, measured once per export: what every
    exported model is compared with."""

    perplexity: Perplexity
    prompt: np.ndarray  # [1, prompt_len] held-out tokens
    greedy: np.ndarray  # [1, new_tokens]: rtdlm.model.generate's greedy continuation

    def compare(self, perplexity: Perplexity, greedy: np.ndarray) -> Comparison:
        return Comparison(self.perplexity, perplexity, self.greedy, greedy)


def jax_reference(cfg: ModelConfig, params: Params, rows: np.ndarray) -> Reference:
    """Perplexity on `rows`, and the greedy continuation of a held-out prompt: 16 tokens (half
    the context if shorter) continued by 64 (what fits, if fewer)."""
    prompt_len = min(16, cfg.seq_len // 2)
    prompt, new_tokens = rows[:1, :prompt_len], min(64, cfg.seq_len - prompt_len)
    greedy = jax_greedy(cfg, params, prompt, new_tokens)
    return Reference(jax_perplexity(cfg, params, rows), prompt, greedy)
