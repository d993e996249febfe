"""Symmetric per-output-channel INT8 weight quantization of a parameter pytree."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

PyTree = Any


class QuantizedTensor(NamedTuple):
    """int8 values and one float32 scale per output channel (the last axis)."""

    values: np.ndarray
    scale: np.ndarray


def quantize_tensor(w: np.ndarray) -> QuantizedTensor:
    w = np.asarray(w, np.float32)
    max_abs = np.abs(w).max(axis=tuple(range(w.ndim - 1)), keepdims=True)
    scale = np.where(max_abs > 0, max_abs / 127.0, 1.0).astype(np.float32)
    values = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return QuantizedTensor(values, scale)


def dequantize_tensor(q: QuantizedTensor) -> np.ndarray:
    return q.values.astype(np.float32) * q.scale


def _is_weight_matrix(x: Any) -> bool:
    return np.ndim(x) >= 2 and np.issubdtype(np.asarray(x).dtype, np.floating)


def quantize_params(params: PyTree) -> PyTree:
    """Quantizes every floating matrix; vectors (norm scales, biases) stay float32."""
    return jax.tree_util.tree_map(
        lambda x: quantize_tensor(x) if _is_weight_matrix(x) else np.asarray(x), params
    )


def dequantize_params(quantized: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x: dequantize_tensor(x) if isinstance(x, QuantizedTensor) else x,
        quantized,
        is_leaf=lambda x: isinstance(x, QuantizedTensor),
    )


def nbytes(tree: PyTree) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree))
