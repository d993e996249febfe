"""Weight-only, symmetric, per-output-channel INT8 of a model's parameters.

Every weight matrix becomes int8 values `w` and float32 scales `w_scale` (one per output
channel, and per layer and expert when stacked), in the layout rtdlm.model runs directly (see
rtdlm.model.linear). What stays float32, and why:
- norm scales: vectors, a negligible share of the bytes, and they set every activation's scale;
- the MoE router: [d, experts] is tiny, and a flipped top-k choice changes a token's whole MLP.
The embedding is quantized per vocabulary row as well: it is most of the bytes of a
large-vocabulary model, and quantizing it leaves held-out perplexity about where quantizing the
matrices alone does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from rtdlm.model.linear import SCALE_SUFFIX

# Parameters as Haiku lays them out ({module: {name: array}}), here as host arrays.
Params = Mapping[str, Mapping[str, Any]]

FLOAT_MODULES = frozenset({"router"})  # by the module's last name
MATRICES = frozenset({"w", "w_gate", "w_up", "w_down", "embeddings"})


class QuantizedTensor(NamedTuple):
    values: np.ndarray  # int8, w's shape
    scale: np.ndarray  # float32, w's shape with the reduced axis kept as 1


def quantize_tensor(w: np.ndarray, axis: int = -2) -> QuantizedTensor:
    """Symmetric INT8 with one scale per slice along every axis but `axis` (the contraction
    axis of a [..., in, out] weight: one scale per output channel, layer and expert)."""
    w = np.asarray(w, np.float32)
    step = np.abs(w).max(axis=axis, keepdims=True) / np.float32(127.0)
    # A slice of zeros, or of subnormals whose step underflows to 0, quantizes to zeros.
    scale = np.where(step > 0, step, np.float32(1.0)).astype(np.float32)
    values = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return QuantizedTensor(values, scale)


def dequantize_tensor(q: QuantizedTensor) -> np.ndarray:
    return q.values.astype(np.float32) * q.scale


def quantizes(module: str, name: str) -> bool:
    """Whether `quantize` turns parameter `name` of `module` into INT8."""
    return name in MATRICES and module.split("/")[-1] not in FLOAT_MODULES


def quantize(params: Params) -> dict[str, dict[str, np.ndarray]]:
    """The parameters with every weight matrix as int8 `NAME` and float32 `NAME_scale`."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for module, leaves in params.items():
        out[module] = {}
        for name, leaf in leaves.items():
            value = np.asarray(leaf)
            if not quantizes(module, name) or value.dtype == np.int8:
                out[module][name] = value
                continue
            # The embedding [vocab, d] is read by row and is the tied output's [out, in].
            q = quantize_tensor(value, axis=-1 if name == "embeddings" else -2)
            out[module][name], out[module][name + SCALE_SUFFIX] = q.values, q.scale
    return out


def dequantize(params: Params) -> dict[str, dict[str, np.ndarray]]:
    """Float32 parameters from quantized ones (what the INT8 model computes, as float)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for module, leaves in params.items():
        out[module] = {}
        for name, leaf in leaves.items():
            if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in leaves:
                continue
            scale = leaves.get(name + SCALE_SUFFIX)
            value = np.asarray(leaf)
            out[module][name] = (
                value
                if scale is None
                else dequantize_tensor(QuantizedTensor(value, np.asarray(scale)))
            )
    return out


def is_quantized(params: Params) -> bool:
    return any(np.asarray(v).dtype == np.int8 for v in jax.tree_util.tree_leaves(params))


def nbytes(tree: Any) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree))
