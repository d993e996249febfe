"""Symmetric per-output-channel INT8 weight quantization of a parameter pytree."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

PyTree = Any

# Haiku's biases and norm parameters: vectors per layer, even when stacked as [layers, d].
VECTOR_NAMES = frozenset({"b", "scale", "offset"})


class QuantizedTensor(NamedTuple):
    """int8 values and one float32 scale per output channel (the last axis) of each matrix:
    stacked weights [layers, (experts,) in, out] get their own per layer and expert."""

    values: np.ndarray
    scale: np.ndarray  # w.shape with the contraction axis (-2) reduced to 1


def quantize_tensor(w: np.ndarray) -> QuantizedTensor:
    w = np.asarray(w, np.float32)
    # Only the contraction axis is reduced: a scale shared across layers or experts would let
    # the largest one set the step for all of them.
    max_abs = np.abs(w).max(axis=-2, keepdims=True)
    scale = np.where(max_abs > 0, max_abs / 127.0, 1.0).astype(np.float32)
    values = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return QuantizedTensor(values, scale)


def dequantize_tensor(q: QuantizedTensor) -> np.ndarray:
    return q.values.astype(np.float32) * q.scale


def _is_weight_matrix(path: tuple[Any, ...], x: Any) -> bool:
    name = getattr(path[-1], "key", None) if path else None
    floating = np.issubdtype(np.asarray(x).dtype, np.floating)
    return np.ndim(x) >= 2 and floating and name not in VECTOR_NAMES


def quantize_params(params: PyTree) -> PyTree:
    """Quantizes every floating weight matrix, stacked or not; biases and norm scales (leaves
    named as in VECTOR_NAMES, or 1-D) stay float32."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: quantize_tensor(x) if _is_weight_matrix(path, x) else np.asarray(x),
        params,
    )


def dequantize_params(quantized: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x: dequantize_tensor(x) if isinstance(x, QuantizedTensor) else x,
        quantized,
        is_leaf=lambda x: isinstance(x, QuantizedTensor),
    )


def nbytes(tree: PyTree) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree))
