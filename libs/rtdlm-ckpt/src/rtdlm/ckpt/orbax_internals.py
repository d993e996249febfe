"""Every use rtdlm.ckpt makes of orbax's private attributes, in one place.

orbax-checkpoint has no public handle for three things the manager needs:

- `await_tmp_cleanup`: orbax removes interrupted saves' temporary directories on a background
  thread and waits for that only inside its next save; a manager just opened must have swept
  them before it lists steps.
- `commit_futures`: when one item of an async save fails, orbax stops waiting at that first
  failure while the other items' writer threads go on and would recreate the temporary
  directory rtdlm removes; rtdlm cancels and joins them.
- `use_s3_driver`: orbax 0.12 builds tensorstore specs for gs:// only and takes any other path
  for a local one (`s3://b/x` becomes the relative `s3:/b/x`); three of its module functions
  are wrapped so s3:// goes to tensorstore's s3 driver the way gs:// goes to its gcs driver.

At run time the first two degrade quietly if orbax moves the attribute (the sweep before the next
save removes what comes back), so an upgrade never breaks training. `check` is strict: the
test suite calls it, and an orbax release that moves any of them fails that one test with a
message naming the attribute and this module.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any, Protocol

import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import gcs_utils
from orbax.checkpoint._src.serialization import tensorstore_utils

from rtdlm.ckpt import paths

# Attribute paths on an async orbax CheckpointManager; check() requires each.
_CLEANUP = "_maybe_await_cleanup_tmp_directory"
_FUTURES = "_checkpointer._async_manager._commit_futures"
_GONE = object()


class Write(Protocol):
    """One of orbax's commit futures: an item's writes."""

    def result(self, timeout: float | None = None) -> Any: ...

    def cancel(self) -> bool | None: ...


class OrbaxInternalsChanged(RuntimeError):
    """An orbax-checkpoint release moved a private attribute rtdlm.ckpt relies on."""


def await_tmp_cleanup(manager: ocp.CheckpointManager) -> None:
    """Waits for orbax's background removal of interrupted saves' temporary directories."""
    wait = _lookup(manager, _CLEANUP)
    if callable(wait):
        wait()


def commit_futures(manager: ocp.CheckpointManager) -> list[Write]:
    """The writes of the async save in flight (empty when none, or where orbax moved them)."""
    found = _lookup(manager, _FUTURES)
    return [] if found is _GONE or not found else list(found)


# Module functions use_s3_driver wraps: (module, name).
_S3_HOOKS = (
    (tensorstore_utils, "_use_gcs_driver"),  # whether a path goes to a remote driver
    (tensorstore_utils, "_normalize_path"),  # os.path.normpath, which folds "s3://" to "s3:/"
    (gcs_utils, "get_kvstore_for_gcs"),  # the remote driver's kvstore spec
)


def use_s3_driver() -> None:
    """Makes orbax write and read s3:// arrays through tensorstore's s3 driver (idempotent)."""
    missing = [
        f"{module.__name__}.{name}" for module, name in _S3_HOOKS if not hasattr(module, name)
    ]
    if missing:
        raise OrbaxInternalsChanged(
            f"orbax-checkpoint {ocp.__version__} has no {', '.join(missing)}, so it cannot save "
            "to s3://: update rtdlm/ckpt/orbax_internals.py for this release (or pin the "
            "previous one)"
        )
    if getattr(gcs_utils.get_kvstore_for_gcs, "rtdlm_s3", False):
        return
    remote, normalize = tensorstore_utils._use_gcs_driver, tensorstore_utils._normalize_path
    kvstore = gcs_utils.get_kvstore_for_gcs
    tensorstore_utils._use_gcs_driver = _marked(lambda d: d.startswith("s3://") or remote(d))
    tensorstore_utils._normalize_path = _marked(
        lambda path: _S3_FOLDED.sub("s3://", normalize(path))
    )
    gcs_utils.get_kvstore_for_gcs = _marked(
        lambda path: paths.kvstore(path) if path.startswith("s3://") else kvstore(path)
    )


_S3_FOLDED = re.compile(r"^s3:/(?=[^/])")


def _marked(function: Callable[[str], Any]) -> Callable[[str], Any]:
    @functools.wraps(function)
    def wrapper(path: str) -> Any:
        return function(os.fspath(path))

    wrapper.rtdlm_s3 = True  # type: ignore[attr-defined]
    return wrapper


def check(manager: ocp.CheckpointManager) -> None:
    """Raises OrbaxInternalsChanged naming each private attribute that `manager` (an async
    orbax CheckpointManager) or orbax's modules no longer have."""
    missing = [
        f"CheckpointManager.{path}"
        for path in (_CLEANUP, _FUTURES)
        if _lookup(manager, path) is _GONE
    ]
    missing += [
        f"{module.__name__}.{name}" for module, name in _S3_HOOKS if not hasattr(module, name)
    ]
    if missing:
        raise OrbaxInternalsChanged(
            f"orbax-checkpoint {ocp.__version__} has no {', '.join(missing)}: update "
            "rtdlm/ckpt/orbax_internals.py for this release (or pin the previous one)"
        )


def _lookup(obj: object, path: str) -> Any:
    """The attribute at a dotted path, or _GONE where a name on the way is missing; a None
    on the way (no save has run yet) is returned as None."""
    for name in path.split("."):
        if obj is None:
            return None
        obj = getattr(obj, name, _GONE)
        if obj is _GONE:
            return _GONE
    return obj
