"""Training checkpoints on orbax's CheckpointManager: async, atomic, verified, reshardable.

A checkpoint is one orbax step directory with an item per part, so a params-only load reads
nothing else:

    <directory>/<step>/params/      tensorstore (OCDBT) arrays
                       opt_state/   tensorstore arrays (absent for params-only saves)
                       data_state/  JSON from the caller's data iterator
                       config/      JSON: the resolved run config
                       rtdlm/       JSON: RNG key, metrics, versions, git revision, time, size
                       rtdlm_manifest.json   size and SHA-256 of every file above

Orbax writes into `<step>.orbax-checkpoint-tmp` and renames it when complete; the manifest is
written in that window, so a killed save leaves only a temporary directory, which restore never
sees and the next manager removes. Nothing is pickled: restoring reads arrays and JSON only.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import math
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rtdlm.ckpt import integrity
from rtdlm.ckpt.retention import PreservationPolicy, Retention

PyTree = Any
log = logging.getLogger(__name__)

_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_STATE_ITEMS = ("params", "opt_state")
_JSON_ITEMS = ("data_state", "config", "rtdlm")
_VERSIONED = ("jax", "jaxlib", "orbax-checkpoint", "tensorstore", "numpy", "optax", "dm-haiku")


class CheckpointError(Exception):
    """A checkpoint that cannot be used, with the reason and the fix."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, truncated or altered."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    params: PyTree
    opt_state: PyTree | None = None
    rng: jax.Array | None = None
    data_state: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SaveInfo:
    step: int
    blocking_seconds: float  # how long save() held the caller, waiting included
    wait_seconds: float  # of which waiting for the previous save to finish


def git_revision() -> str | None:
    """RTDLM_GIT_REVISION (set by images and CI), else `git rev-parse HEAD` here, else None."""
    if revision := os.environ.get("RTDLM_GIT_REVISION"):
        return revision
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def _versions() -> dict[str, str]:
    names = list(_VERSIONED) + sorted(
        name
        for dist in importlib.metadata.distributions()
        if (name := dist.metadata["Name"] or "").startswith("rtdlm-")
    )
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _rng_to_json(rng: jax.Array) -> dict[str, Any]:
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(rng) if typed else rng)
    return {
        "typed": bool(typed),
        "impl": str(jax.random.key_impl(rng)) if typed else None,
        "shape": list(data.shape),
        "dtype": str(data.dtype),
        "data": data.ravel().tolist(),
    }


def _rng_from_json(saved: dict[str, Any]) -> jax.Array:
    data = jnp.asarray(np.asarray(saved["data"], saved["dtype"]).reshape(saved["shape"]))
    return jax.random.wrap_key_data(data, impl=saved["impl"]) if saved["typed"] else data


def _abstract_on_default_device(metadata_tree: PyTree) -> PyTree:
    """A restore target from saved metadata: every array whole on this process's first device."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), metadata_tree
    )


def _restore_arg(item_dir: epath.Path, target: PyTree) -> ocp.args.CheckpointArgs:
    if item_dir.name in _JSON_ITEMS:
        return ocp.args.JsonRestore()
    if target is None:  # read this item's metadata only: params-only loads never touch the rest
        target = _abstract_on_default_device(ocp.StandardCheckpointHandler().metadata(item_dir))
    return ocp.args.StandardRestore(_as_target(target))


def _as_target(tree: PyTree) -> PyTree:
    """Concrete arrays become shape/dtype/sharding descriptions: nothing is read from them."""
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
            if hasattr(x, "shape") and hasattr(x, "dtype")
            else x
        ),
        tree,
    )


def _path(directory: str | os.PathLike[str]) -> epath.Path:
    """Local paths made absolute (tensorstore requires it); URLs such as gs:// pass through."""
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _check_readable(directory: epath.Path) -> None:
    if not directory.is_dir():
        raise CheckpointError(
            f"no checkpoint directory at {directory}: pass the run's checkpoints directory"
        )
    if (directory / "_CHECKPOINT_METADATA").exists():
        raise CheckpointError(
            f"{directory} is one checkpoint, not a checkpoint directory: "
            f"pass {directory.parent} and step {directory.name}"
        )


def _summary(error: BaseException, limit: int = 300) -> str:
    """One line of an orbax/tensorstore error, which can run to pages of JSON spec."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CheckpointManager:
    """Saves and restores training checkpoints under one directory.

    A class because an async save in flight is state; everything it stores is a pytree or JSON.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        retention: Retention | None = None,
        *,
        async_save: bool = True,
        read_only: bool = False,
    ) -> None:
        self.directory = _path(directory)
        if not read_only and self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is a file: pass a directory for checkpoints")
        retention = retention or Retention()
        self._read_only = read_only
        self._async = async_save
        self._writing: int | None = None
        self._committed: int | None = None
        self._git_revision: str | None = None
        self._versions: dict[str, str] | None = None
        options = ocp.CheckpointManagerOptions(
            preservation_policy=PreservationPolicy(retention),
            # Orbax records metrics, and reads them back for retention, only with a best_fn.
            best_fn=lambda metrics: metrics.get(retention.best_metric, math.nan),
            best_mode=retention.best_mode,
            cleanup_tmp_directories=not read_only,
            # Always orbax's async checkpointer: only it calls `_seal` before the commit rename.
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal),
            read_only=read_only,
            create=not read_only,
        )
        handlers = {item: ocp.StandardCheckpointHandler() for item in _STATE_ITEMS}
        handlers |= {item: ocp.JsonCheckpointHandler() for item in _JSON_ITEMS}
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Waits for the save in flight, then releases orbax's threads."""
        self._manager.close()

    def wait(self) -> None:
        """Blocks until the save in flight is committed (or raises its error)."""
        self._manager.wait_until_finished()

    def committed(self) -> int | None:
        """The newest step this manager saved that is committed by now; never blocks."""
        writing = self._writing
        if (
            writing is not None
            and not self._manager.is_saving_in_progress()
            and (self.directory / str(writing)).exists()
        ):
            self._committed = writing
        return self._committed

    def steps(self) -> list[int]:
        """Committed steps, oldest first (a save in flight is not one until it commits)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    # -- saving ------------------------------------------------------------------------------

    def _seal(self) -> None:
        """Orbax calls this after writing and before the commit rename: add the manifest."""
        if self._writing is None or jax.process_index() != 0:
            return
        tmp = self.directory / f"{self._writing}{_TMP_SUFFIX}"
        integrity.write_manifest(tmp if tmp.exists() else self.directory / str(self._writing))

    def _static_metadata(self) -> dict[str, Any]:
        if self._versions is None:
            self._versions = _versions()
            self._git_revision = git_revision()
        return {"versions": self._versions, "git_revision": self._git_revision}

    def save(
        self,
        step: int,
        *,
        params: PyTree,
        opt_state: PyTree | None = None,
        rng: jax.Array | None = None,
        data_state: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> SaveInfo:
        """Starts writing checkpoint `step` and returns once the arrays are copied off-device.

        The arrays may be donated or overwritten as soon as this returns. The previous save is
        waited for first; retention runs after each commit.
        """
        if self._read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; open it to write")
        started = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - started
        self.committed()  # the previous save, if any, is committed now
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            raise CheckpointError(
                f"cannot save step {step} in {self.directory}: it already holds step {latest}; "
                "resume from it or use a new run directory"
            )
        metrics = {name: float(value) for name, value in (metrics or {}).items()}
        rtdlm = {
            "format": 1,
            "step": step,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "hostname": socket.gethostname(),
            "process_count": jax.process_count(),
            "param_count": sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params)),
            "metrics": metrics,
            "rng": None if rng is None else _rng_to_json(rng),
            **self._static_metadata(),
            **(metadata or {}),
        }
        items = {
            "params": ocp.args.StandardSave(params),
            "data_state": ocp.args.JsonSave(dict(data_state or {})),
            "config": ocp.args.JsonSave(dict(config or {})),
            "rtdlm": ocp.args.JsonSave(rtdlm),
        }
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self._writing = step
        self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        if not self._async:
            self.wait()
        return SaveInfo(step, time.perf_counter() - started, waited)

    # -- restoring ---------------------------------------------------------------------------

    def restore(
        self,
        step: int | None = None,
        *,
        params: PyTree = None,
        opt_state: PyTree = None,
        params_only: bool = False,
        verify: bool = True,
    ) -> Checkpoint:
        """Checkpoint `step` (default: newest), verified against its manifest first.

        `params` and `opt_state` are targets: trees of arrays or jax.ShapeDtypeStruct whose
        shardings say where each array goes (this is how a checkpoint moves between device
        layouts). Without one, arrays land whole on this process's first device.
        """
        _check_readable(self.directory)
        self.wait()  # a save in flight from this manager counts once it commits
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}: train first")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}: available steps are {steps}"
            )
        step_dir = self.directory / str(step)
        saved_items = {path.name for path in step_dir.iterdir() if path.is_dir()}
        wanted = ["params", "rtdlm"] + ([] if params_only else ["opt_state", *_JSON_ITEMS])
        wanted = [item for item in dict.fromkeys(wanted) if item in saved_items]
        if "params" not in wanted:
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} has no params"
            )
        if verify:
            try:
                integrity.verify(step_dir, wanted)
            except integrity.IntegrityError as error:
                raise CorruptCheckpointError(
                    f"checkpoint step {step} in {self.directory} is corrupt: {error}"
                ) from error
        targets = {"params": params, "opt_state": opt_state}
        try:
            args = {item: _restore_arg(step_dir / item, targets.get(item)) for item in wanted}
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except (json.JSONDecodeError, FileNotFoundError) as error:
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} is unreadable: {_summary(error)}"
            ) from error
        except ValueError as error:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not fit the requested state "
                f"({_summary(error)}): it was saved for a different model or optimizer config"
            ) from error
        except Exception as error:  # tensorstore reports unreadable data as plain exceptions
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} is unreadable: {_summary(error)}"
            ) from error
        rtdlm = dict(restored.get("rtdlm") or {})
        rng = rtdlm.pop("rng", None)
        return Checkpoint(
            step=step,
            params=restored["params"],
            opt_state=restored.get("opt_state"),
            rng=None if rng is None else _rng_from_json(rng),
            data_state=dict(restored.get("data_state") or {}),
            config=dict(restored.get("config") or {}),
            metadata=rtdlm,
        )

    def restore_latest(self, **kwargs: Any) -> Checkpoint:
        """The newest intact checkpoint; corrupt newer ones are renamed aside, never deleted."""
        _check_readable(self.directory)
        problems = []
        for step in reversed(self.steps()):
            try:
                checkpoint = self.restore(step, **kwargs)
            except CorruptCheckpointError as error:
                problems.append(str(error))
                self._set_aside(step)
                continue
            if problems:
                log.warning(
                    "restored step %d instead of newer corrupt checkpoints: %s",
                    step,
                    "; ".join(problems),
                )
            return checkpoint
        raise CheckpointError(
            f"no intact checkpoint in {self.directory}: "
            + ("; ".join(problems) or "it holds no complete checkpoint")
        )

    def _set_aside(self, step: int) -> None:
        """Renames a corrupt step so orbax stops counting it; its bytes stay for a post-mortem."""
        if self._read_only or jax.process_index() != 0:
            return
        source = self.directory / str(step)
        target = self.directory / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        source.rename(target)
        log.warning("moved corrupt checkpoint %s to %s", source, target)
        self._manager.reload()


def restore_params(
    directory: str | os.PathLike[str], step: int | None = None, params: PyTree = None
) -> Checkpoint:
    """Params (and metadata) only, for inference and export: optimizer state is never read."""
    _check_readable(_path(directory))
    with CheckpointManager(directory, read_only=True) as manager:
        if step is None:
            return manager.restore_latest(params=params, params_only=True)
        return manager.restore(step, params=params, params_only=True)
