"""Weight matrices that may be stored as INT8.

A trained matrix `w` is float32. A weight-only INT8 model (rtdlm.export.quantize) stores it as
int8 values `w` and one scale per output channel `w_scale`, so that w ~= values * w_scale. As
the scale is per output channel, x @ (values * scale) == (x @ values) * scale: the matmul reads
the int8 values (converted to the compute dtype) and the scale multiplies its smaller output.
The same modules run either way; the dtype of the parameter handed to `apply` decides.

In bfloat16 compute every matrix product, forward and backward, reads bfloat16 and accumulates
in float32 (`dot`): that is the form XLA hands to the CPU's bf16 dot instructions (about 3x a
float32 dot here), where a bf16 -> bf16 dot, or autodiff's float32 gradient dots, run slower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

SCALE_SUFFIX = "_scale"


def _dot_f32(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _low_precision_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return _dot_f32(x, w, (x.ndim - 1, 0)).astype(x.dtype)


def _low_precision_dot_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    return _low_precision_dot(x, w), (x, w)


def _low_precision_dot_bwd(
    residuals: tuple[jax.Array, ...], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    dx = _dot_f32(g, w, (g.ndim - 1, 1)).astype(x.dtype)  # g @ w.T
    rows = x.reshape(-1, x.shape[-1])
    dw = _dot_f32(rows, g.reshape(-1, g.shape[-1]), (0, 0)).astype(w.dtype)  # x.T @ g
    return dx, dw


_low_precision_dot.defvjp(_low_precision_dot_fwd, _low_precision_dot_bwd)


def dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w for x [..., in] and w [in, out]; below float32, accumulated in float32 both ways."""
    if x.dtype == jnp.float32 or x.dtype != w.dtype:
        return jnp.dot(x, w)
    return _low_precision_dot(x, w)


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


def _weight(in_size: int, size: int, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array | None]:
    # hk.Linear(size, with_bias=False)'s parameter and initialisation, exactly; INT8 values
    # come back converted to `dtype` with their scale.
    init = hk.initializers.TruncatedNormal(1.0 / np.sqrt(in_size))
    w = hk.get_parameter("w", [in_size, size], init=init)
    if w.dtype != jnp.int8:
        return w, None
    return w.astype(dtype), hk.get_parameter("w" + SCALE_SUFFIX, [1, size])


def linears(x: jax.Array, layers: Sequence[tuple[str, int]]) -> list[jax.Array]:
    """Bias-free dense layers [(module name, width), ...] of the same input, as one matmul
    against their weights side by side: one pass over x and one larger, faster dot. Each
    layer keeps its own module and parameter w [in, width]."""
    weights = [
        hk.to_module(_weight)(name=name)(x.shape[-1], size, x.dtype) for name, size in layers
    ]
    w = jnp.concatenate([w for w, _ in weights], axis=1) if len(weights) > 1 else weights[0][0]
    y = dot(x, w)
    if weights[0][1] is not None:
        y = y * jnp.concatenate([scale for _, scale in weights], axis=1)
    ends = np.cumsum([size for _, size in layers])[:-1].tolist()
    return jnp.split(y, ends, axis=-1)


def linear(x: jax.Array, size: int, name: str) -> jax.Array:
    """A bias-free dense layer: the module `name` with parameter w [in, size]."""
    return linears(x, [(name, size)])[0]


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
            return dot(x, table.T)
        return dot(x, table.astype(x.dtype).T) * scale.T
