"""Export artifacts: directories that describe themselves and are written whole or not at all.

Each holds `artifact.json` (kind, model config, tokenizer, the checkpoint and weights it came
from, library versions, and the checks it passed) beside its data files, and rtdlm-ckpt's
manifest of every file's size and XXH3-128 digest, checked whenever it is read. It is built in a
hidden sibling directory and renamed into place, so a failed export leaves nothing, and an
existing artifact is replaced only when asked to.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from etils import epath

from rtdlm import ckpt
from rtdlm.ckpt import integrity
from rtdlm.data import Tokenizer
from rtdlm.export.quantize import Params
from rtdlm.model import ModelConfig

MANIFEST = "artifact.json"
FORMAT = 1
_VERSIONED = ("jax", "jaxlib", "dm-haiku", "numpy", "onnx", "onnxruntime", "safetensors")


class ExportError(Exception):
    """A problem with an export's input or output, as one line naming what to do."""


class CheckFailed(ExportError):
    """An artifact failed one of its checks (parity, generation, perplexity): the numbers."""


@dataclass(frozen=True)
class Trained:
    """A checkpoint's model, ready to export: its config set up for inference (float32 compute,
    blocked attention, no remat), float32 parameters, and where they came from."""

    cfg: ModelConfig
    params: Params
    source: Mapping[str, Any]  # checkpoint, step, params_sha256
    run_config: Mapping[str, Any]  # the run's whole config, as the checkpoint saved it


def params_sha256(params: Params) -> str:
    """A digest of the parameter values (names, dtypes, shapes, bytes), however stored."""
    digest = hashlib.sha256()
    for module in sorted(params):
        for name in sorted(params[module]):
            value = np.ascontiguousarray(np.asarray(params[module][name]))
            digest.update(f"{module}/{name}:{value.dtype.str}:{value.shape};".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """The trained model as export measures it on this machine: float32, no remat, and
    attention that runs on any backend (a run trained with cuDNN's is checked on a CPU)."""
    return dataclasses.replace(cfg, compute_dtype="float32", attention="blocked", remat="none")


def model_config(fields: Any, where: str) -> ModelConfig:
    """The ModelConfig a checkpoint or artifact records, or one line saying why not."""
    if not isinstance(fields, Mapping) or not fields:
        raise ExportError(f"{where} records no model config; was it written by rtdlm?")
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ExportError(
            f"{where} records a model config this rtdlm cannot build: {error}"
        ) from None


def load_checkpoint(directory: str | os.PathLike[str], step: int | str | None = None) -> Trained:
    """The params of checkpoint `step` (default: the newest intact one; "best": the best by
    held-out loss) of a run directory or its checkpoints/, verified, with the model config the
    run saved beside them. Errors are ckpt.CheckpointError or ExportError."""
    try:
        path = ckpt.storage_path(directory)  # local (made absolute), s3:// or gs://
    except ckpt.StoragePathError as error:
        raise ExportError(str(error)) from None
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    checkpoint = ckpt.restore_params(path, step)  # type: ignore[arg-type]
    where = f"checkpoint step {checkpoint.step} in {path}"
    cfg = model_config(checkpoint.config.get("model"), where)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), checkpoint.params)
    source = {
        "checkpoint": str(path if ckpt.is_remote(path) else Path(path).resolve()),
        "step": checkpoint.step,
        "params_sha256": params_sha256(params),
    }
    return Trained(inference_config(cfg), params, source, checkpoint.config)


def check_output(out: Path, force: bool) -> None:
    """Refuses an existing output unless `force`; called before any work is done."""
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")


def describe(kind: str, trained: Trained, tokenizer: Tokenizer, **sections: Any) -> dict[str, Any]:
    """The artifact.json of an artifact of `kind` made from `trained`."""
    return {
        "format": FORMAT,
        "kind": kind,
        "model": dataclasses.asdict(trained.cfg),
        "tokenizer": dict(tokenizer.index_entry),
        "source": dict(trained.source),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": ckpt.package_versions(_VERSIONED),
        "git_revision": ckpt.git_revision(),
        **sections,
    }


def write_artifact(
    out: Path,
    build: Callable[[Path], Mapping[str, Any]],
    tokenizer: Tokenizer,
    force: bool = False,
) -> None:
    """Has `build` write and check the data files in a fresh directory and return its
    artifact.json; adds the tokenizer's files and the file manifest, then moves the directory
    to `out` (replacing what is there if `force`). If `build` raises, nothing is left."""
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest = build(staging)
        for file in tokenizer.files:
            shutil.copy2(file, staging / file.name)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        integrity.write_manifest(epath.Path(staging))
        umask = os.umask(0)
        os.umask(umask)
        for file in staging.iterdir():  # readable as any file this user writes (not 0600)
            file.chmod(0o666 & ~umask)
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(old)
            staging.rename(out)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_artifact(path: str | os.PathLike[str], kinds: tuple[str, ...]) -> dict[str, Any]:
    """artifact.json of the artifact at `path`, once every file matches the manifest."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise ExportError(
            f"{path} is not an rtdlm export artifact (no {MANIFEST}); make one with exporter "
            "quantize or exporter onnx"
        )
    try:
        integrity.verify(epath.Path(path))
    except integrity.IntegrityError as error:
        raise ExportError(f"{path} is corrupt: {error}; export it again") from None
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT or manifest.get("kind") not in kinds:
        raise ExportError(
            f"{path} is a {manifest.get('kind')!r} artifact (format {manifest.get('format')}), "
            f"not {' or '.join(repr(kind) for kind in kinds)} (format {FORMAT})"
        )
    return manifest
