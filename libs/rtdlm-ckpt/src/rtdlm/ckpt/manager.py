"""Training checkpoints on orbax's CheckpointManager: async, atomic, verified, reshardable.

A checkpoint is one orbax step directory with an item per part, so a params-only load reads
nothing else:

    <directory>/<step>/params/      tensorstore (OCDBT) arrays
                       opt_state/   tensorstore arrays (absent for params-only saves)
                       data_state/  JSON from the caller's data iterator
                       config/      JSON: the resolved run config
                       rtdlm/       JSON: RNG key, metrics, versions, git revision, time, size
                       rtdlm_manifest.json   size and XXH3-128 digest of every file above

Orbax writes into `<step>.orbax-checkpoint-tmp` and renames it when complete; the manifest is
written in that window, so a killed save leaves only a temporary directory, which restore never
sees and the next manager removes. Nothing is pickled: restoring reads arrays and JSON only.

A save that fails (a full disk) is one CheckpointSaveError, raised once by whichever call
learns of it first, after its temporary directory is removed; the manager then saves again as
usual. orbax's own reports of it, a traceback from each of its threads, are dropped (quiet.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import importlib.metadata
import logging
import math
import os
import re
import shutil
import socket
import subprocess  # nosec B404 # only for `git rev-parse HEAD` below
import tempfile
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rtdlm.ckpt import arrays, integrity, orbax_internals, paths, quiet
from rtdlm.ckpt.retention import PreservationPolicy, Retention, best_of

PyTree = Any
log = logging.getLogger(__name__)

_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_ASIDE = ".corrupt-"  # a corrupt step set aside: <step>.corrupt-<time>
_QUIET_SECONDS = 0.2  # after a failed save, how long its temporary directory must stay gone
_STATE_ITEMS = ("params", "opt_state")
_JSON_ITEMS = ("data_state", "config", "rtdlm")
_VERSIONED = ("jax", "jaxlib", "orbax-checkpoint", "tensorstore", "numpy", "optax", "dm-haiku")


class CheckpointError(Exception):
    """A checkpoint that cannot be used, with the reason and the fix."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, truncated or altered."""


class NoIntactCheckpointError(CheckpointError):
    """Every committed checkpoint is corrupt (or there is none): `corrupt` holds each step and
    what is wrong with it. Nothing was renamed or changed."""

    def __init__(self, directory: epath.Path, corrupt: list[tuple[int, str]]) -> None:
        self.directory, self.corrupt = directory, corrupt
        problems = "; ".join(problem for _, problem in corrupt)
        super().__init__(
            f"no intact checkpoint in {directory}: "
            + (problems or "it holds no complete checkpoint")
        )


class CheckpointSaveError(CheckpointError):
    """A save that failed (a full disk, say): what was lost, what is left, and what to do.

    Raised once per failed step, by whichever call first learns of it (save, wait, committed,
    close). By then the partial save is removed and the manager can save again. The cause's
    text is kept in `reason` (an OSError's strerror where there is one); its traceback, which
    runs through orbax's threads, is not (it is logged at DEBUG by rtdlm.ckpt.manager).
    """

    def __init__(
        self,
        step: int,
        path: epath.Path,
        reason: str,
        *,
        errno: int | None = None,
        free_bytes: int | None = None,
        last_good: int | None = None,
        removed: bool = True,
    ) -> None:
        self.step = step
        self.path = path  # the step's directory, which was never committed
        self.reason = reason
        self.errno = errno
        self.free_bytes = free_bytes  # in the checkpoint directory when the save failed
        self.last_good = last_good  # the newest committed step that is intact, if any
        self.removed = removed
        super().__init__(self._message())

    def _message(self) -> str:
        free = "" if self.free_bytes is None else f" ({_size(self.free_bytes)} free)"
        directory = self.path.parent
        parts = [
            f"checkpoint step {self.step} could not be saved to {self.path}: {self.reason}{free}",
            "the partial save was removed"
            if self.removed
            else f"the partial save in {directory} could not be removed",
            f"there is no earlier checkpoint in {directory}"
            if self.last_good is None
            else f"the last good checkpoint is step {self.last_good} in {directory}",
        ]
        hints = {
            errno.ENOSPC: "free space or lower train.keep_checkpoints",
            errno.EDQUOT: "free space or lower train.keep_checkpoints",
            errno.EFBIG: "raise the file size limit (ulimit -f) or free space",
        }
        hint = hints.get(self.errno) if self.errno is not None else None
        return "; ".join(parts) + (f": {hint}" if hint else "")


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
        result = subprocess.run(  # nosec B603 B607 # a fixed argv, no shell; git from PATH
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def package_versions(packages: Iterable[str] = _VERSIONED) -> dict[str, str]:
    """Installed versions of `packages` and of every rtdlm-* distribution, for metadata."""
    names = list(packages) + sorted(
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


def _saved_target(item_dir: epath.Path) -> PyTree:
    """A restore target from the item's metadata (nothing else read); with no sharding, arrays
    land whole on this process's first device (rtdlm.ckpt.arrays.read)."""
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
        ocp.StandardCheckpointHandler().metadata(item_dir).tree,
    )


def _array_handler() -> ocp.PyTreeCheckpointHandler:
    """Arrays stored uncompressed: zstd saved under 10% of the bytes of trained float weights
    and halved restore throughput. Checkpoints written compressed still restore."""
    return ocp.PyTreeCheckpointHandler(use_compression=False)


def _read_arrays(
    step_dir: epath.Path, targets: dict[str, PyTree], check: _Check | None
) -> dict[str, PyTree]:
    """Array items, all at once through rtdlm.ckpt.arrays; orbax reads trees of other leaves.
    The check starts once the reads are planned."""
    targets = {
        item: _as_target(_saved_target(step_dir / item) if target is None else target)
        for item, target in targets.items()
    }
    arrays_only = {
        item: target
        for item, target in targets.items()
        if all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(target))
    }
    plan = arrays.plan(step_dir, arrays_only)
    restored = arrays.read(plan, on_file=None if check is None else check.start(plan.whole))
    for item in targets.keys() - arrays_only.keys():
        target = targets[item]
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        try:
            restored[item] = _array_handler().restore(
                step_dir / item, args=ocp.args.PyTreeRestore(target, restore_args=restore_args)
            )
        except ValueError as error:  # orbax's word for a tree that does not fit
            raise arrays.Mismatch(quiet.one_line(error)) from error
    return restored


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
    """Local paths made absolute (tensorstore requires it); s3:// and gs:// as they are."""
    try:
        return paths.storage_path(directory)
    except paths.StoragePathError as error:
        raise CheckpointError(str(error)) from None


# Object storage renames nothing atomically (a folder is a copy, then a delete), so there a step
# is written where it ends up and is committed by a last small file: orbax's way on GCS.
_COMMIT_FILE = ocp.path.atomicity.CommitFileTemporaryPath
_COMMITTED = "commit_success.txt"


def _temporary_path_class(directory: epath.Path) -> type[Any] | None:
    if not paths.is_remote(directory):
        return None  # orbax's default: a temporary folder renamed when complete
    if str(directory).startswith("s3://"):
        orbax_internals.use_s3_driver()
    return _COMMIT_FILE


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


def _check_writable(directory: epath.Path) -> None:
    """A local directory that refuses files (a read-only mount) is found now, not after the
    steps up to the first save were trained and lost."""
    if paths.is_remote(directory):
        return
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise CheckpointError(
            f"cannot write checkpoints to {directory}: {error.strerror}: make it writable "
            "(is it mounted read-only?) or save them elsewhere"
        ) from None


# tensorstore reports an OS error inside a long message: `...: No space left on device
# [os_error_code='28']`, raised by orbax as a ValueError.
_OS_ERROR_CODE = re.compile(r"os_error_code\W{0,3}(\d+)")


def _os_error(error: BaseException) -> tuple[str, int | None]:
    """The strerror and errno behind a failed write, else a one-line summary and None."""
    for current in quiet.chain(error):
        if isinstance(current, OSError) and current.errno is not None:
            return current.strerror or os.strerror(current.errno), current.errno
        if match := _OS_ERROR_CODE.search(str(current)):
            code = int(match.group(1))
            return os.strerror(code), code
    return quiet.one_line(error), None


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _free_bytes(directory: epath.Path) -> int | None:
    if paths.is_remote(directory):
        return None
    try:
        return shutil.disk_usage(os.fspath(directory)).free
    except OSError:
        return None


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
        if not read_only:
            _check_writable(self.directory)
        retention = retention or Retention()
        quiet.install()
        self.retention = retention
        self._read_only = read_only
        self._async = async_save
        self._writing: int | None = None  # the step `_seal` seals
        self._pending: int | None = None  # the step saved whose outcome is not yet reported
        self._committed: int | None = None
        self._failed_tmp: set[epath.Path] = set()  # removed, but stragglers may recreate them
        self._git_revision: str | None = None
        self._versions: dict[str, str] | None = None
        # orbax's default step directories, kept so steps() can list them without orbax's
        # reload, which also starts new threads to read every step's metrics, even for one step.
        commit = _temporary_path_class(self.directory)
        self._step_names = ocp.path.step.standard_name_format(temporary_path_cls=commit)
        with quiet.read_only_notices() if read_only else contextlib.nullcontext():
            options = ocp.CheckpointManagerOptions(
                step_name_format=self._step_names,
                preservation_policy=PreservationPolicy(retention),
                # Orbax records metrics, and reads them back for retention, only with a best_fn.
                best_fn=lambda metrics: metrics.get(retention.best_metric, math.nan),
                best_mode=retention.best_mode,
                cleanup_tmp_directories=not read_only,
                # Always orbax's async checkpointer: only it calls `_seal` before the commit
                # rename.
                enable_async_checkpointing=True,
                async_options=ocp.AsyncOptions(
                    post_finalization_callback=self._seal,
                    # On object storage a step's folders are made before save returns: made
                    # in the background, one that fails (the bucket gone) leaves orbax's other
                    # writers waiting minutes for it.
                    create_directories_asynchronously=not paths.is_remote(self.directory),
                ),
                read_only=read_only,
                create=not read_only,
                temporary_path_class=commit,
            )
            handlers = {item: _array_handler() for item in _STATE_ITEMS}
            handlers |= {item: ocp.JsonCheckpointHandler() for item in _JSON_ITEMS}
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )
        # orbax removes interrupted saves' temporary directories in the background and waits
        # for that only in its next save: wait here, so an opened manager has swept them.
        orbax_internals.await_tmp_cleanup(self._manager)

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        try:
            self.close()
        except CheckpointSaveError as error:
            if exc_type is None:
                raise
            log.warning("%s", error)  # another error is on its way out: do not mask it

    def close(self) -> None:
        """Waits for the save in flight, then releases orbax's threads.

        Raises CheckpointSaveError if that save failed and nobody was told yet; the threads
        are released either way.
        """
        try:
            self.wait()
        finally:
            with quiet.claims.waiting():
                try:
                    self._manager.close()
                except Exception as error:  # only a failure already reported can be left
                    log.debug("orbax close after a reported failure: %s", quiet.one_line(error))
            self._sweep()

    def wait(self) -> None:
        """Blocks until the save in flight is committed.

        Raises CheckpointSaveError if it failed (once: afterwards wait returns normally).
        """
        self._settle()

    def committed(self) -> int | None:
        """The newest step this manager saved that is committed by now; never blocks.

        Poll it every training step: once the save in flight has failed, the next call raises
        its CheckpointSaveError (once; the partial save is already removed when it does) and
        later calls return the newest committed step again.
        """
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self._settle()  # the save's threads are done: this only collects the outcome
        return self._committed

    def _settle(self) -> None:
        """Waits for orbax, then records the save's outcome or raises its failure, once."""
        pending = self._pending
        try:
            with quiet.claims.waiting():
                self._manager.wait_until_finished()
        except Exception as error:
            if pending is None:  # orbax raises a failure again in each new thread that waits
                log.debug(
                    "orbax re-raised a save failure already reported: %s", quiet.one_line(error)
                )
                return
            self._pending = None
            if self._sealed(pending):  # it failed after the commit rename: nothing was lost
                quiet.claims.finish(str(self.directory / str(pending)), failed=True)
                self._committed = pending
                self._manager.reload()  # orbax forgot the step when it raised
                log.warning(
                    "checkpoint step %d is committed, but orbax reported after the commit: %s",
                    pending,
                    quiet.one_line(error),
                )
                return
            raise self._save_failed(pending, error) from None
        if pending is not None:
            self._pending = None
            quiet.claims.finish(str(self.directory / str(pending)), failed=False)
            if (self.directory / str(pending)).exists():
                self._committed = pending

    def steps(self) -> list[int]:
        """Committed steps, oldest first (a save in flight is not one until it commits)."""
        return sorted(metadata.step for metadata in self._step_names.find_all(self.directory))

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

    def _save_failed(self, step: int, error: BaseException) -> CheckpointSaveError:
        """Removes what the failed save left, so it takes no disk space, and says so."""
        log.debug("checkpoint step %d failed", step, exc_info=error)
        step_dir = self.directory / str(step)
        free = _free_bytes(self.directory)  # before cleanup: what the save ran into
        self._stop_writers()
        removed = self._remove_partial(step)
        quiet.claims.finish(str(step_dir), failed=True)
        try:
            self._manager.reload()  # orbax dropped steps it meant to delete after this save
            last_good = self._last_good()
        except Exception as reload_error:  # the message matters more than the last good step
            log.debug("no last good step: %s", quiet.one_line(reload_error))
            last_good = None
        reason, code = _os_error(error)
        return CheckpointSaveError(
            step,
            step_dir,
            reason,
            errno=code,
            free_bytes=free,
            last_good=last_good,
            removed=removed,
        )

    def _stop_writers(self, timeout: float = 30.0) -> None:
        """Cancels the failed save's other writes and waits for them (bounded).

        orbax stops waiting at the first write that fails; the other items' writer threads go
        on and would recreate the temporary directory after it is removed
        (rtdlm.ckpt.orbax_internals)."""
        futures = orbax_internals.commit_futures(self._manager)
        for future in futures:
            with contextlib.suppress(Exception):  # one that is done may object
                future.cancel()  # unwritten arrays are not written at all
        deadline = time.monotonic() + timeout
        for future in futures:
            with contextlib.suppress(Exception, asyncio.CancelledError):  # its own error
                future.result(timeout=max(deadline - time.monotonic(), 0.01))

    def _sealed(self, step: int) -> bool:
        """Whether `step` is committed with all its files there (sizes only: nothing read)."""
        step_dir = self.directory / str(step)
        try:
            integrity.verify(step_dir, hashes=False)
        except Exception:  # missing files; an unreachable bucket (botocore's own errors)
            return False
        return True

    def _remove_partial(self, step: int) -> bool:
        """Removes `<step>.orbax-checkpoint-tmp`, and `<step>` if it has no valid manifest."""
        if jax.process_index() != 0:
            return True
        try:
            return self._remove_partial_here(step)
        except Exception as error:  # an unreachable bucket: what is left is not committed
            log.debug(
                "could not remove the partial save of step %d: %s", step, quiet.one_line(error)
            )
            return False

    def _remove_partial_here(self, step: int) -> bool:
        tmp = self.directory / f"{step}{_TMP_SUFFIX}"
        self._failed_tmp.add(tmp)
        removed = self._remove(tmp)
        # tensorstore finishes writes that orbax gave up on and recreates their (empty)
        # directories, some milliseconds later: remove again until it stays gone for a while
        quiet_since = started = time.monotonic()
        while removed and time.monotonic() - quiet_since < _QUIET_SECONDS:
            if time.monotonic() - started > 20 * _QUIET_SECONDS:
                break  # the sweep before the next save removes what still comes back
            time.sleep(0.01)
            if tmp.exists():
                removed = self._remove(tmp)
                quiet_since = time.monotonic()
        step_dir = self.directory / str(step)
        if step_dir.exists() and not self._sealed(step):  # renamed, but never sealed
            removed = self._remove(step_dir) and removed
        return removed

    @staticmethod
    def _remove(path: epath.Path) -> bool:
        for _ in range(3):  # a write still finishing may add a file while the tree goes
            try:
                if path.exists():
                    path.rmtree()
                return True
            except FileNotFoundError:
                return True
            except Exception as error:  # OSError, or an object store's client error
                problem = error
        log.debug("could not remove %s: %s", path, quiet.one_line(problem))
        return False

    def _sweep(self) -> None:
        """Removes failed saves' temporary directories that writes finishing late recreated."""
        for tmp in list(self._failed_tmp):
            if self._remove(tmp):
                self._failed_tmp.discard(tmp)

    def _last_good(self) -> int | None:
        """The newest committed step whose files are all there (sizes only: nothing read)."""
        return next(
            (
                step
                for step in sorted(self._manager.all_steps(), reverse=True)
                if self._sealed(step)
            ),
            None,
        )

    def _static_metadata(self) -> dict[str, Any]:
        if self._versions is None:
            self._versions = package_versions()
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
        waited for first; retention runs after each commit. If the previous save failed and
        nobody was told yet, this raises its CheckpointSaveError (naming that step) without
        starting this one; call again to save. A save that fails here or later raises
        CheckpointSaveError for `step`.
        """
        if self._read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; open it to write")
        started = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - started
        self._sweep()
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
            "params": ocp.args.PyTreeSave(params),
            "data_state": ocp.args.JsonSave(dict(data_state or {})),
            "config": ocp.args.JsonSave(dict(config or {})),
            "rtdlm": ocp.args.JsonSave(rtdlm),
        }
        if opt_state is not None:
            items["opt_state"] = ocp.args.PyTreeSave(opt_state)
        self._writing = step
        quiet.claims.start(str(self.directory / str(step)))
        self._pending = step
        try:
            with quiet.claims.waiting():
                self._manager.save(
                    step, args=ocp.args.Composite(**items), metrics=metrics, force=True
                )
        except Exception as error:
            self._pending = None
            raise self._save_failed(step, error) from None
        if not self._async:
            self.wait()
        return SaveInfo(step, time.perf_counter() - started, waited)

    # -- restoring ---------------------------------------------------------------------------

    def best_step(self) -> int | None:
        """The committed step with the best `retention.best_metric` (under `best_mode`), ties
        to the later step as retention has it; None if no committed step has the metric.

        Reads the metrics orbax keeps beside each step, so a restarted manager knows it too.
        """
        history = [(step, self._manager.metrics(step)) for step in self.steps()]
        return best_of(history, self.retention)

    def restore(
        self,
        step: int | Literal["best"] | None = None,
        *,
        params: PyTree = None,
        opt_state: PyTree = None,
        params_only: bool = False,
        verify: bool = True,
    ) -> Checkpoint:
        """Checkpoint `step` (default: newest; "best": `best_step()`), verified first.

        `params` and `opt_state` are targets: trees of arrays or jax.ShapeDtypeStruct whose
        shardings say where each array goes (this is how a checkpoint moves between device
        layouts). Without one, arrays land whole on this process's first device.
        """
        _check_readable(self.directory)
        self.wait()  # a save in flight from this manager counts once it commits
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}: train first")
        if step == "best":
            best = self.best_step()
            if best is None:
                raise CheckpointError(
                    f"no checkpoint in {self.directory} has the metric "
                    f"{self.retention.best_metric!r}: save with metrics to restore the best, "
                    f"or pick one of steps {steps}"
                )
            step = best
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}: available steps are {steps}"
            )
        step_dir = self.directory / str(step)
        saved_items = {path.name for path in step_dir.iterdir() if path.is_dir()}
        wanted = ["params", "rtdlm", "config"]
        wanted += [] if params_only else ["opt_state", *_JSON_ITEMS]
        wanted = [item for item in dict.fromkeys(wanted) if item in saved_items]
        if "params" not in wanted:
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} has no params"
            )
        targets = {"params": params, "opt_state": opt_state}
        with ThreadPoolExecutor(1) as pool:
            # Nothing is returned unless the manifest check passes.
            check = _Check(pool, step_dir, wanted) if verify else None
            try:
                restored = self._read(step, wanted, targets, check)
            except CheckpointError:
                self._raise_if_altered(step, check)  # the manifest names the damaged file
                raise
            self._raise_if_altered(step, check)
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

    def _read(
        self, step: int, items: list[str], targets: dict[str, PyTree], check: _Check | None
    ) -> dict[str, Any]:
        step_dir = self.directory / str(step)
        try:
            # Each document by the handler, skipping the overhead of orbax's manager.restore.
            documents = ocp.JsonCheckpointHandler()
            restored = {
                item: documents.restore(step_dir / item) for item in items if item in _JSON_ITEMS
            }
            wanted = {item: targets.get(item) for item in items if item not in _JSON_ITEMS}
            return restored | _read_arrays(step_dir, wanted, check)
        except arrays.Mismatch as error:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not fit the requested state "
                f"({quiet.one_line(error)}): it was saved for a different model or optimizer config"
            ) from error
        except Exception as error:  # tensorstore reports unreadable data as plain exceptions
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} is unreadable: {quiet.one_line(error)}"
            ) from error

    def _raise_if_altered(self, step: int, check: _Check | None) -> None:
        error = None if check is None else check.error()
        if isinstance(error, integrity.IntegrityError):
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} is corrupt: {error}"
            ) from error
        if error is not None:
            raise error

    def restore_latest(self, **kwargs: Any) -> Checkpoint:
        """The newest intact checkpoint. Newer corrupt ones are then renamed aside (never
        deleted) and reported in one warning; where none is intact, nothing is renamed and
        NoIntactCheckpointError names each step's problem, the same on every retry."""
        _check_readable(self.directory)
        self.wait()  # a save in flight from this manager counts once it commits
        corrupt: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                checkpoint = self.restore(step, **kwargs)
            except CorruptCheckpointError as error:
                corrupt.append((step, str(error)))
                continue
            except CheckpointError:
                if step in self.steps():
                    raise
                continue  # set aside meanwhile by process 0 of a multi-process restore
            if corrupt:
                moved = [self.set_aside(bad) for bad, _ in corrupt]
                where = "moved to " + ", ".join(str(path) for path in moved)
                if None in moved:
                    where = "left in place (read-only)" if self._read_only else "process 0 moves it"
                problems = "; ".join(problem for _, problem in corrupt)
                log.warning("%s; %s; restored step %d instead", problems, where, step)
            return checkpoint
        raise NoIntactCheckpointError(self.directory, corrupt)

    def set_aside(self, step: int) -> epath.Path | None:
        """Renames a corrupt step to `<step>.corrupt-<time>` so orbax stops counting it; its
        bytes stay for a post-mortem. Returns the new path; None where this manager does not
        write (read-only, or not process 0)."""
        if self._read_only or jax.process_index() != 0:
            return None
        source = self.directory / str(step)
        target = self.directory / f"{step}{_ASIDE}{time.strftime('%Y%m%d-%H%M%S')}"
        source.rename(target)
        self._manager.reload()
        return target


def committed_steps(directory: str | os.PathLike[str]) -> list[int]:
    """Committed steps in `directory`, oldest first, without orbax: locally from the folder
    names (a save in flight or killed is a temporary folder until it commits), on object
    storage from each step's commit file."""
    path = _path(directory)
    names = [p.name for p in path.iterdir()] if path.is_dir() else []
    steps = sorted(int(name) for name in names if name.isdigit())
    if paths.is_remote(path):
        steps = [step for step in steps if (path / str(step) / _COMMITTED).exists()]
    return steps


def set_aside_steps(directory: str | os.PathLike[str]) -> list[str]:
    """Names of the checkpoints `set_aside` moved out of `directory`, oldest step first."""
    path = _path(directory)
    names = [p.name for p in path.iterdir()] if path.is_dir() else []
    aside = [name for name in names if re.fullmatch(r"\d+" + re.escape(_ASIDE) + r".+", name)]
    return sorted(aside, key=lambda name: (int(name.split(".")[0]), name))


_CHECKED_AFTER = 2**20  # bytes the check may hash itself after the reads: a negligible wait


class _Check:
    """One restore's manifest check. Files the reads cover whole are hashed by the reading
    threads from the bytes just read, and where the rest is metadata-sized (at most a
    sixteenth of the bytes, or 1 MiB) it is checked after the reads: beside them, its
    contention with the reads cost more than its own work. Where the check has more to read
    itself (tensorstore's layouts, files read in part, other processes' files), it reads every
    file on its own thread beside the reads."""

    def __init__(self, pool: ThreadPoolExecutor, step_dir: epath.Path, items: list[str]):
        self._pool, self._step_dir, self._items = pool, step_dir, items
        self._hashed: dict[str, str] = {}
        self._beside: Future[None] | None = None

    def start(self, whole: Collection[str]) -> arrays.OnFile | None:
        """Called once the reads are planned; what to call with each file read whole."""
        read_whole = {os.path.relpath(path, self._step_dir) for path in whole}
        try:
            listed = integrity.sizes(self._step_dir, self._items)
        except integrity.IntegrityError:
            listed = {}  # the check itself names what is wrong
        left = sum(size for name, size in listed.items() if name not in read_whole)
        if read_whole and left <= max(_CHECKED_AFTER, sum(listed.values()) // 16):
            return self._read_whole
        self._beside = self._pool.submit(integrity.verify, self._step_dir, self._items)
        return None

    def _read_whole(self, path: str, parts: Iterator[memoryview]) -> None:
        self._hashed[os.path.relpath(path, self._step_dir)] = integrity.digest(parts)

    def error(self) -> BaseException | None:
        """What the check raised, if anything: the one beside the reads once done, else run
        now (reads that failed before they were planned leave it every file to read)."""
        if self._beside is not None:
            return self._beside.exception()
        try:
            integrity.verify(self._step_dir, self._items, hashed=self._hashed)
        except Exception as error:  # raised by the caller, as a check beside would
            return error
        return None


def restore_params(
    directory: str | os.PathLike[str],
    step: int | Literal["best"] | None = None,
    params: PyTree = None,
    *,
    retention: Retention | None = None,
) -> Checkpoint:
    """Params, config and metadata only, for inference and export: optimizer state is never
    read.

    `step="best"` picks by `retention`'s best_metric and best_mode (default: lowest eval_loss).
    """
    _check_readable(_path(directory))
    with CheckpointManager(directory, retention, read_only=True) as manager:
        if step is None:
            return manager.restore_latest(params=params, params_only=True)
        return manager.restore(step, params=params, params_only=True)
