"""The ONNX artifact: prefill and decode graphs that are checked against the JAX model before
they are written, float32 or with INT8 MatMul weights from ONNX Runtime's quantizer.

Both graphs keep their weights in one shared external data file (`weights.onnx.data`), so the
artifact holds each weight once and has no 2 GB protobuf limit. Validation is part of export:
`onnx.checker`'s full check of each graph; logits and cache of prefill and a decode step against
rtdlm.model on random and held-out inputs (float32: max abs difference at most 1e-4); a greedy
generation in ONNX Runtime with the cache graphs token for token equal to rtdlm.model.generate's;
and held-out perplexity against float32 JAX (INT8: within the limit). Any miss raises ExportError
with the numbers, and nothing is written.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import external_data_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from rtdlm.data import Tokenizer
from rtdlm.export import quality
from rtdlm.export.artifact import (
    CheckFailed,
    ExportError,
    Trained,
    check_output,
    describe,
    model_config,
    read_artifact,
    write_artifact,
)
from rtdlm.export.int8 import DEFAULT_MAX_INCREASE
from rtdlm.export.onnx_graph import OPSET, UnsupportedModel, decoder_graph
from rtdlm.export.onnx_runtime import GRAPHS, KIND, OnnxModel
from rtdlm.model import build_decoder, init_cache

DATA = "weights.onnx.data"
PARITY = 1e-4  # float32 logits and cache: max abs difference to rtdlm.model
_ALIGN = 4096  # external tensors start on page boundaries, so runtimes can map them


@dataclass(frozen=True)
class OnnxReport:
    int8: bool
    vs_float32: quality.Comparison  # ONNX Runtime against rtdlm.model in float32
    max_abs_diff: dict[str, float]  # float32 only: logits and cache, random and held-out
    bytes: int
    checks: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return self.vs_float32.as_json() | {
            "int8": self.int8,
            "max_abs_diff": self.max_abs_diff,
            "parity_limit": None if self.int8 else PARITY,
            "bytes": self.bytes,
            "checks": self.checks,
        }


def save_graphs(models: Mapping[str, onnx.ModelProto], directory: Path) -> None:
    """Writes each graph as directory/NAME, every tensor of 1 KiB or more once into DATA."""
    placed: dict[str, tuple[int, int, str]] = {}  # name -> offset, length, sha256
    with open(directory / DATA, "wb") as data:
        for file, model in models.items():
            for tensor in model.graph.initializer:
                raw = tensor.raw_data
                if len(raw) < 1024:
                    continue
                digest = hashlib.sha256(raw).hexdigest()
                if tensor.name not in placed:
                    data.write(b"\0" * (-data.tell() % _ALIGN))
                    placed[tensor.name] = (data.tell(), len(raw), digest)
                    data.write(raw)
                offset, length, seen = placed[tensor.name]
                if seen != digest:  # both graphs are built from the same parameters
                    raise ValueError(f"{tensor.name} differs between the graphs")
                external_data_helper.set_external_data(tensor, DATA, offset, length)
                tensor.ClearField("raw_data")
            onnx.save_model(model, str(directory / file))


class _DropAdvice(logging.Filter):
    """ONNX Runtime's quantizer logs advice on the root logger at every call; not ours to show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")


def quantize_graphs(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic INT8: MatMul weights per output channel (activations quantized
    on the fly per tensor); attention's MatMuls, which have no constant weight, stay float."""
    quantized, advice = {}, _DropAdvice()
    logging.getLogger().addFilter(advice)
    try:
        for file in GRAPHS.values():
            quantize_dynamic(
                source / file,
                target / file,
                per_channel=True,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"],
                extra_options={"MatMulConstBOnly": True},
            )
            quantized[file] = onnx.load(str(target / file))
            (target / file).unlink()
    finally:
        logging.getLogger().removeFilter(advice)
    save_graphs(quantized, target)


def _parity(model: OnnxModel, trained: Trained, rows: np.ndarray) -> dict[str, float]:
    """Max abs differences to rtdlm.model (at most PARITY, else CheckFailed): prefill logits
    and cache of random tokens, the logits of one decode step after them, and prefill logits
    of held-out rows."""
    cfg, params = trained.cfg, trained.params
    rng = np.random.default_rng(0)
    batch, time = 2, min(cfg.seq_len - 1, 24)
    tokens = rng.integers(0, cfg.vocab_size, (batch, time))
    step_tokens = rng.integers(0, cfg.vocab_size, (batch, 1))
    decode = jax.jit(build_decoder(cfg).apply)  # one compile per shape, not one per operation
    logits, cache = decode(
        params, None, jnp.asarray(tokens, jnp.int32), init_cache(cfg, batch, time + 1)
    )
    step_logits, _ = decode(params, None, jnp.asarray(step_tokens, jnp.int32), cache)
    onnx_logits, onnx_cache = model.prefill(tokens)
    onnx_step, _ = model.step(step_tokens, onnx_cache)
    # rtdlm.model's cache is [layers, batch, max_len, kv_heads, head_dim]; ONNX's, per layer
    # and kind, [batch, kv_heads, time, head_dim] (past_key.0, past_value.0, past_key.1, ...).
    jax_cache = [
        np.asarray(kv[layer, :, :time]).transpose(0, 2, 1, 3)
        for layer in range(cfg.num_layers)
        for kv in (cache.k, cache.v)
    ]
    held_out = rows[:2, : cfg.seq_len]
    diffs = {
        "prefill_logits_random": float(np.abs(onnx_logits - np.asarray(logits)).max()),
        "cache_random": max(
            float(np.abs(a - b).max()) for a, b in zip(onnx_cache, jax_cache, strict=True)
        ),
        "decode_logits_random": float(np.abs(onnx_step - np.asarray(step_logits)).max()),
        "prefill_logits_held_out": float(
            np.abs(model.logits(held_out) - quality.jax_logits(cfg, params)(held_out)).max()
        ),
    }
    worst = max(diffs, key=diffs.__getitem__)
    if diffs[worst] > PARITY:
        raise CheckFailed(
            f"ONNX Runtime differs from the JAX model: max abs {worst.replace('_', ' ')} "
            f"difference {diffs[worst]:.2e} > {PARITY:.0e} ("
            + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
            + "); nothing was written"
        )
    return diffs


def _check_graphs(directory: Path) -> list[str]:
    for file in GRAPHS.values():
        try:
            onnx.checker.check_model(str(directory / file), full_check=True)
        except onnx.checker.ValidationError as error:
            raise CheckFailed(f"{directory / file} fails onnx.checker: {error}") from None
    return [f"onnx.checker full check: {file}" for file in GRAPHS.values()]


def _check_float(
    model: OnnxModel, trained: Trained, rows: np.ndarray, reference: quality.Reference
) -> tuple[dict[str, float], np.ndarray, list[str]]:
    """Float32 graphs match rtdlm.model (_parity) and generate the same greedy tokens: the
    differences, ONNX Runtime's greedy tokens, and the checks passed."""
    diffs = _parity(model, trained, rows)
    new_tokens = reference.greedy.shape[1]
    greedy = model.generate(reference.prompt, new_tokens)
    same = reference.compare(reference.perplexity, greedy).greedy_agreement
    if same < new_tokens:
        raise CheckFailed(
            f"greedy generation in ONNX Runtime departs from rtdlm.model.generate at token "
            f"{same + 1} of {new_tokens} ({greedy[0, same]} instead of "
            f"{reference.greedy[0, same]}); nothing was written"
        )
    checks = [
        f"float32 parity <= {PARITY:.0e}",
        f"greedy generation of {new_tokens} tokens identical to rtdlm.model",
    ]
    return diffs, greedy, checks


def validate(
    directory: Path,
    trained: Trained,
    rows: np.ndarray,
    int8: bool,
    max_increase: float,
    reference: quality.Reference,
) -> OnnxReport:
    """Every check of the ONNX graphs in `directory` against `trained`, whose float32 JAX
    measurements on `rows` are `reference`."""
    checks = _check_graphs(directory)
    cfg = trained.cfg
    model = OnnxModel(directory, cfg)
    diffs: dict[str, float] = {}
    if int8:
        greedy = model.generate(reference.prompt, reference.greedy.shape[1])
    else:
        diffs, greedy, float_checks = _check_float(model, trained, rows, reference)
        checks += float_checks
    measured = quality.perplexity(model.logits, rows, quality.eval_batch_size(cfg))
    vs_float32 = reference.compare(measured, greedy)
    vs_float32.check("INT8 ONNX" if int8 else "ONNX", max_increase)
    checks.append(f"held-out perplexity within {max_increase:.2%} of JAX float32")
    size = sum((directory / file).stat().st_size for file in (*GRAPHS.values(), DATA))
    return OnnxReport(int8, vs_float32, diffs, size, checks)


def export_onnx(
    trained: Trained,
    rows: np.ndarray,
    out: Path,
    tokenizer: Tokenizer,
    *,
    int8: bool = False,
    max_increase: float = DEFAULT_MAX_INCREASE,
    force: bool = False,
) -> OnnxReport:
    """Builds, validates and writes the ONNX artifact of `trained` at `out` (see the module)."""
    check_output(out, force)
    try:
        graphs = {
            GRAPHS["prefill"]: decoder_graph(trained.cfg, trained.params, past=False),
            GRAPHS["decode"]: decoder_graph(trained.cfg, trained.params, past=True),
        }
    except UnsupportedModel as error:
        raise ExportError(str(error)) from None
    reference = quality.jax_reference(trained.cfg, trained.params, rows)
    reports = []

    def build(directory: Path) -> dict[str, Any]:
        if not int8:
            save_graphs(graphs, directory)
            reports.append(validate(directory, trained, rows, False, max_increase, reference))
        else:
            float_graphs = directory / "float32"  # what INT8 is made of, checked first
            float_graphs.mkdir()
            save_graphs(graphs, float_graphs)
            _check_graphs(float_graphs)
            _check_float(OnnxModel(float_graphs, trained.cfg), trained, rows, reference)
            quantize_graphs(float_graphs, directory)
            shutil.rmtree(float_graphs)
            reports.append(validate(directory, trained, rows, True, max_increase, reference))
        return manifest(trained, tokenizer, int8, reports[0])

    write_artifact(out, build, tokenizer, force)
    return reports[0]


def manifest(
    trained: Trained, tokenizer: Tokenizer, int8: bool, report: OnnxReport
) -> dict[str, Any]:
    return describe(
        KIND,
        trained,
        tokenizer,
        onnx={
            "opset": OPSET,
            "graphs": GRAPHS,
            "external_data": DATA,
            "int8": int8,
            "inputs": "input_ids int64 [batch, sequence]; decode: input_ids [batch, 1] and "
            "past_key.{i}/past_value.{i} float32 [batch, kv_heads, past_sequence, head_dim]",
            "outputs": "logits float32 [batch, sequence, vocab]; present_key.{i}/"
            "present_value.{i} [batch, kv_heads, total_sequence, head_dim]",
        },
        validation=report.as_json(),
    )


def verify_onnx(
    path: Path, trained: Trained, rows: np.ndarray, max_increase: float = DEFAULT_MAX_INCREASE
) -> OnnxReport:
    """Runs the export's checks again on an existing ONNX artifact against `trained`."""
    artifact = read_artifact(path, (KIND,))
    cfg = model_config(artifact.get("model"), str(path))
    if cfg != trained.cfg:
        differ = [
            f"{name}: {getattr(cfg, name)} vs {getattr(trained.cfg, name)}"
            for name in cfg.__dataclass_fields__
            if getattr(cfg, name) != getattr(trained.cfg, name)
        ]
        raise ExportError(
            f"{path} was exported from another model config than the checkpoint's ("
            + "; ".join(differ)
            + "): verify it against the checkpoint it came from"
        )
    source = artifact.get("source", {})
    if source.get("params_sha256") != trained.source["params_sha256"]:
        raise ExportError(
            f"{path} was exported from other weights (step {source.get('step')} of "
            f"{source.get('checkpoint')}) than step {trained.source['step']} of "
            f"{trained.source['checkpoint']}: verify it against the checkpoint it came from"
        )
    int8 = bool(artifact["onnx"]["int8"])
    reference = quality.jax_reference(trained.cfg, trained.params, rows)
    return validate(Path(path), trained, rows, int8, max_increase, reference)
