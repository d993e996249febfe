"""Weight matrices that may be stored as INT8.

A trained matrix `w` is float32. A weight-only INT8 model (rtdlm.export.quantize) stores it as
int8 values `w` and one scale per output channel `w_scale`, so that w ~= values * w_scale. As
the scale is per output channel, x @ (values * scale) == (x @ values) * scale: the matmul reads
the int8 values (converted to the compute dtype) and the scale multiplies its smaller output.
The same modules run either way; the dtype of the parameter handed to `apply` decides.

In bfloat16 compute every matrix product, forward and backward, reads bfloat16 and accumulates
in float32 (`dot`): that is the form XLA hands to the CPU's bf16 dot instructions (faster
than a float32 dot), where a bf16 -> bf16 dot, or autodiff's float32 gradient dots, run slower.
The weight gradient is written out too, in the form the CPU's fast kernels take (`_weight_grad`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

SCALE_SUFFIX = "_scale"


def _dot_f32(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _transposed(a: jax.Array) -> jax.Array:
    """a [..., n] as [n, rows], transposed in memory.

    XLA folds a plain 2-D transpose into the dot that reads it, and a dot that contracts both
    operands' major axis runs on XLA:CPU's slow generic kernel (bfloat16 operands converted to
    float32 first, far slower than the same product on YNNPACK). Through a 3-D view the
    transpose stays a transpose, and the dot that reads it stays on YNNPACK.
    """
    rows = a.reshape(-1, a.shape[-1])
    split = math.gcd(rows.shape[0], 16)
    return jnp.moveaxis(rows.reshape(split, -1, a.shape[-1]), -1, 0).reshape(a.shape[-1], -1)


def _weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    """x.T @ g over every leading axis, accumulated in float32, with the smaller of x and g
    transposed (`_transposed`) on CPUs, so that the dot runs on the fast kernels (which
    matters most in bfloat16). GPU dots take any operand layout."""
    rows, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if jax.default_backend() != "cpu":
        return _dot_f32(rows, g, (0, 0))
    if rows.shape[1] <= g.shape[1]:
        return _dot_f32(_transposed(rows), g, (1, 0))
    # (g.T @ x).T, the product behind a barrier: XLA would fold its transpose into the dot
    return jax.lax.optimization_barrier(_dot_f32(_transposed(g), rows, (1, 0))).T


@jax.custom_vjp
def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return _dot_f32(x, w, (x.ndim - 1, 0)).astype(x.dtype)


def _dot_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    return _dot(x, w), (x, w)


def _dot_bwd(residuals: tuple[jax.Array, ...], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    dx = _dot_f32(g, w, (g.ndim - 1, 1)).astype(x.dtype)  # g @ w.T
    return dx, _weight_grad(x, g).astype(w.dtype)


_dot.defvjp(_dot_fwd, _dot_bwd)


def dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w for x [..., in] and w [in, out], accumulated in float32 both ways."""
    if x.dtype != w.dtype:
        return jnp.dot(x, w)
    return _dot(x, w)


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


def _weights(
    x: jax.Array, layers: Sequence[tuple[str, int]]
) -> list[tuple[jax.Array, jax.Array | None]]:
    return [hk.to_module(_weight)(name=name)(x.shape[-1], size, x.dtype) for name, size in layers]


def _side_by_side(x: jax.Array, weights: list[tuple[jax.Array, jax.Array | None]]) -> jax.Array:
    """x @ [w_1 | w_2 | ...]: one pass over x and one larger, faster dot."""
    w = jnp.concatenate([w for w, _ in weights], axis=1) if len(weights) > 1 else weights[0][0]
    y = dot(x, w)
    scales = [scale for _, scale in weights if scale is not None]  # INT8: one per output
    return y * jnp.concatenate(scales, axis=1) if scales else y


def linears(x: jax.Array, layers: Sequence[tuple[str, int]]) -> list[jax.Array]:
    """Bias-free dense layers [(module name, width), ...] of the same input, as one matmul
    against their weights side by side. Each layer keeps its own module and parameter
    w [in, width]."""
    y = _side_by_side(x, _weights(x, layers))
    ends = np.cumsum([size for _, size in layers])[:-1].tolist()
    return jnp.split(y, ends, axis=-1)


def _silu_gate(h: jax.Array, dtype: jnp.dtype) -> jax.Array:
    gate, up = jnp.split(h, 2, axis=-1)
    return (jax.nn.silu(gate) * up).astype(dtype)


@jax.custom_vjp
def _gated_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return _silu_gate(_dot_f32(x, w, (x.ndim - 1, 0)), x.dtype)


def _gated_dot_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    h = _dot_f32(x, w, (x.ndim - 1, 0))
    return _silu_gate(h, x.dtype), (x, w, h.astype(x.dtype))


def _gated_dot_bwd(residuals: tuple[jax.Array, ...], d_out: jax.Array) -> tuple[jax.Array, ...]:
    x, w, h = residuals
    gate, up = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    sigmoid, d_out = jax.nn.sigmoid(gate), d_out.astype(jnp.float32)
    d_gate = d_out * up * sigmoid * (1 + gate * (1 - sigmoid))  # silu' = s (1 + gate (1 - s))
    dh = jnp.concatenate([d_gate, d_out * gate * sigmoid], axis=-1).astype(x.dtype)
    dx = _dot_f32(dh, w, (dh.ndim - 1, 1)).astype(x.dtype)
    return dx, _weight_grad(x, dh).astype(w.dtype)


_gated_dot.defvjp(_gated_dot_fwd, _gated_dot_bwd)


def swiglu(x: jax.Array, size: int) -> jax.Array:
    """silu(gate(x)) * up(x), the modules `gate` and `up` [in, size] as in `linears`.

    The product and its gradient are one pass each over the float32 output of the joint
    gate/up matmul, converted to x's dtype once: XLA:CPU's bfloat16 elementwise arithmetic
    runs slower than float32, and autodiff split it into several passes (float32 losses
    agree to 1e-6)."""
    weights = _weights(x, [("gate", size), ("up", size)])
    if weights[0][1] is None and weights[0][0].dtype == x.dtype:
        return _gated_dot(x, jnp.concatenate([w for w, _ in weights], axis=1))
    return _silu_gate(_side_by_side(x, weights), x.dtype)  # INT8 weights: inference only


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
