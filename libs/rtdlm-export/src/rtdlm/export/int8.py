"""The JAX INT8 artifact: weight-only INT8 parameters that rtdlm.model runs as they are.

`model.safetensors` holds each parameter under its Haiku path (`block_0/attn/query/w` int8,
`.../w_scale` float32, norms float32); artifact.json says what model, tokenizer and checkpoint
it is and how its held-out perplexity compares with float32's. Quantizing fails, writing
nothing, when that perplexity rises by more than the limit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from rtdlm.data import Tokenizer
from rtdlm.export import quality
from rtdlm.export.artifact import (
    ExportError,
    Trained,
    check_output,
    describe,
    model_config,
    params_sha256,
    read_artifact,
    write_artifact,
)
from rtdlm.export.quantize import FLOAT_MODULES, Params, is_quantized, nbytes, quantize
from rtdlm.model import ModelConfig

KIND = "jax-int8"
WEIGHTS = "model.safetensors"
DEFAULT_MAX_INCREASE = 0.02  # 2% more held-out perplexity than float32


@dataclass(frozen=True)
class Int8Report:
    vs_float32: quality.Comparison
    float32_bytes: int
    int8_bytes: int

    def as_json(self) -> dict[str, Any]:
        sizes = {"bytes_float32": self.float32_bytes, "bytes_int8": self.int8_bytes}
        return self.vs_float32.as_json() | sizes


def flatten(params: Params) -> dict[str, np.ndarray]:
    return {
        f"{m}/{n}": np.ascontiguousarray(v)
        for m, leaves in params.items()
        for n, v in leaves.items()
    }


def unflatten(arrays: dict[str, np.ndarray]) -> Params:
    params: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        module, name = key.rsplit("/", 1)
        params.setdefault(module, {})[name] = value
    return params


def quantize_checkpoint(
    trained: Trained,
    rows: np.ndarray,
    out: Path,
    tokenizer: Tokenizer,
    max_increase: float = DEFAULT_MAX_INCREASE,
    force: bool = False,
) -> Int8Report:
    """Quantizes `trained`, measures it on held-out `rows` [n, seq_len + 1] against float32,
    and writes the artifact at `out` unless perplexity rose by more than `max_increase`."""
    check_output(out, force)
    cfg, params = trained.cfg, trained.params
    quantized = quantize(params)
    reference = quality.jax_reference(cfg, params, rows)
    report = Int8Report(
        reference.compare(
            quality.jax_perplexity(cfg, quantized, rows),
            quality.jax_greedy(cfg, quantized, reference.prompt, reference.greedy.shape[1]),
        ),
        nbytes(params),
        nbytes(quantized),
    )
    report.vs_float32.check("INT8", max_increase)
    manifest = describe(
        KIND,
        trained,
        tokenizer,
        weights=WEIGHTS,
        quantization={
            "scheme": "weight-only symmetric int8, one scale per output channel",
            "float32": [*sorted(FLOAT_MODULES), "norm scales"],
            "weights_sha256": params_sha256(quantized),
        },
        quality=report.as_json(),
    )

    def build(directory: Path) -> dict[str, Any]:
        save_file(flatten(quantized), str(directory / WEIGHTS))
        return manifest

    write_artifact(out, build, tokenizer, force)
    return report


def load(path: str | os.PathLike[str]) -> tuple[ModelConfig, Params, dict[str, Any]]:
    """The model config, INT8 parameters and artifact.json of a JAX INT8 artifact, verified."""
    manifest = read_artifact(path, (KIND,))
    cfg = model_config(manifest.get("model"), str(path))
    params = unflatten(load_file(str(Path(path) / manifest["weights"])))
    if not is_quantized(params):
        raise ExportError(f"{path} holds no INT8 weights; export it again")
    return cfg, params, manifest
