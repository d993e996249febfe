"""Weight matrices that may be stored as INT8.

A trained matrix `w` is float32. A weight-only INT8 model (rtdlm.export.quantize) stores it as
int8 values `w` and one scale per output channel `w_scale`, so that w ~= values * w_scale. As
the scale is per output channel, x @ (values * scale) == (x @ values) * scale: the matmul reads
the int8 values (converted to the compute dtype) and the scale multiplies its smaller output.
The same modules run either way; the dtype of the parameter handed to `apply` decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

SCALE_SUFFIX = "_scale"


def matmul(
    product: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    name: str,
    shape: Sequence[int],
    init: hk.initializers.Initializer,
) -> jax.Array:
    """product(x, parameter `name`) for a parameter whose last axis is the output channel and
    whose second last is contracted, INT8 or not as it is stored."""
    w = hk.get_parameter(name, list(shape), init=init)
    if w.dtype != jnp.int8:
        return product(x, w)
    scale = hk.get_parameter(name + SCALE_SUFFIX, [*shape[:-2], 1, shape[-1]])
    return product(x, w.astype(x.dtype)) * scale


def _linear(x: jax.Array, size: int) -> jax.Array:
    # hk.Linear(size, with_bias=False)'s parameter, initialisation and product, exactly.
    init = hk.initializers.TruncatedNormal(1.0 / np.sqrt(x.shape[-1]))
    return matmul(jnp.dot, x, "w", (x.shape[-1], size), init)


def linear(x: jax.Array, size: int, name: str) -> jax.Array:
    """A bias-free dense layer: the module `name` with parameter w [in, size]."""
    return hk.to_module(_linear)(name=name)(x, size)


class Embedding(hk.Module):
    """Token embedding [vocab, d]; tied, it also maps the last hidden state back to logits.

    Stored as INT8, each vocabulary row has its own scale (`embeddings_scale` [vocab, 1]): the
    same scale serves the lookup of that token and its output channel in the tied logits.
    """

    def __init__(self, vocab_size: int, d_model: int, name: str = "embed") -> None:
        super().__init__(name=name)
        self.shape = [vocab_size, d_model]

    def table(self) -> tuple[jax.Array, jax.Array | None]:
        init = hk.initializers.TruncatedNormal(0.02)  # hk.Embed's parameter, exactly
        table = hk.get_parameter("embeddings", self.shape, init=init)
        if table.dtype != jnp.int8:
            return table, None
        return table, hk.get_parameter("embeddings" + SCALE_SUFFIX, [self.shape[0], 1])

    def __call__(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
        table, scale = self.table()
        if scale is None:
            return jnp.asarray(table)[tokens]
        return jnp.asarray(table)[tokens].astype(dtype) * jnp.asarray(scale)[tokens]

    def unembed(self, x: jax.Array) -> jax.Array:
        table, scale = self.table()
        if scale is None:
            return x @ table.T
        return (x @ table.astype(x.dtype).T) * scale.T
