"""Every use rtdlm.ckpt makes of orbax's private attributes, in one place.

orbax-checkpoint has no public handle for two things the manager needs:

- `await_tmp_cleanup`: orbax removes interrupted saves' temporary directories on a background
  thread and waits for that only inside its next save; a manager just opened must have swept
  them before it lists steps.
- `commit_futures`: when one item of an async save fails, orbax stops waiting at that first
  failure while the other items' writer threads go on and would recreate the temporary
  directory rtdlm removes; rtdlm cancels and joins them.

At run time each degrades quietly if orbax moves the attribute (the sweep before the next
save removes what comes back), so an upgrade never breaks training. `check` is strict: the
test suite calls it, and an orbax release that moves any of them fails that one test with a
message naming the attribute and this module.
"""

from __future__ import annotations

from typing import Any, Protocol

import orbax.checkpoint as ocp

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


def check(manager: ocp.CheckpointManager) -> None:
    """Raises OrbaxInternalsChanged naming each private attribute that `manager` (an async
    orbax CheckpointManager) no longer has."""
    missing = [
        f"CheckpointManager.{path}"
        for path in (_CLEANUP, _FUTURES)
        if _lookup(manager, path) is _GONE
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
