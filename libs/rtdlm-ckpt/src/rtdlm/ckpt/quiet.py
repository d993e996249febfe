"""Keeps orbax's background threads from printing tracebacks for saves that rtdlm reports.

When an async save fails (a full disk, say), orbax 0.12 logs the one error, with its
traceback, from every thread it passes through: each item's writer thread and the metadata
writer (`_SignalingThread.run() raised an exception`), the `async_save` thread (`Failed to run
N Handler Commit operations`) and the caller's `wait_until_finished` (`Save Finalize thread
failed`), 35 to 115 lines each, and again for each item whose own writes fail too. Those
records go through absl's logger ("absl"), which every absl user shares. Separately,
tensorstore writes that finish after orbax has closed their asyncio loop report
`RuntimeError: Event loop is closed` through `sys.unraisablehook`, a bare traceback each, and
the gathered futures of the failed writes, collected unread, make asyncio's logger report
`_GatheringFuture exception was never retrieved` with the write error's traceback.

rtdlm.ckpt turns such a failure into one CheckpointSaveError, so these copies are noise, but
only these: the filter below drops a record only if it comes from orbax.checkpoint's own
source files, is an ERROR or worse, and is about a save that an rtdlm CheckpointManager has
claimed (in flight, or failed and reported): it is logged while rtdlm itself waits on that
save in the same thread, carries an exception already dropped once, names the save's step
directory (on object storage, also by its key), or carries a disk-full OSError (ENOSPC, EDQUOT:
a write that fails that way while an rtdlm save is claimed is that save's, and rtdlm reports
it; such errors often carry no path) or, while a save to object storage is claimed, an
unreachable bucket.
asyncio's records count only by naming the directory, or by an unreachable bucket while a
save to object storage is claimed. Everything else orbax, absl, asyncio
or tensorstore logs passes untouched. The unraisable
hook drops only that exact closed-loop RuntimeError, and only once an rtdlm save is in flight
or has failed in this process; anything else goes to the previous hook.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import orbax.checkpoint as ocp

from rtdlm.ckpt import paths

_ORBAX_SOURCE = os.path.dirname(os.path.abspath(ocp.__file__)) + os.sep
_REMEMBERED_FAILURES = 8  # failed saves whose late stragglers are still recognised


def chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and the exceptions behind it (cause, else context), each once."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def one_line(error: BaseException, limit: int = 300) -> str:
    """An error as one line of at most `limit` characters: orbax's and tensorstore's can run to
    pages of JSON spec, and a fault ends in one line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _disk_full(error: BaseException) -> bool:
    return any(
        isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain(error)
    )


# How a bucket that stopped answering shows in an error: botocore's and aiohttp's exceptions
# (by name: neither is imported here) and tensorstore's curl messages.
_UNREACHABLE = frozenset(
    {
        "EndpointConnectionError",
        "ClientConnectorError",
        "ClientConnectionResetError",
        "ServerDisconnectedError",
        "ConnectTimeoutError",
    }
)


def unreachable(error: BaseException) -> bool:
    """Whether `error` (or one behind it) says the object store did not answer."""
    return any(type(e).__name__ in _UNREACHABLE or "CURL error" in str(e) for e in chain(error))


def _aliases(step_dir: str) -> list[str]:
    """How errors name a step directory: locally its path; on object storage also its key
    without the scheme and bucket (`prefix/checkpoints/5`), as tensorstore and botocore do."""
    scheme, sep, rest = step_dir.partition("://")
    if not sep or scheme not in ("s3", "gs"):
        return [step_dir]
    key = rest.partition("/")[2]
    return [step_dir, key] if key else [step_dir]


def _texts(error: BaseException) -> Iterator[str]:
    """The text of an error and of its causes, file names included (OSError may omit them)."""
    for current in chain(error):
        yield str(current)
        for name in ("filename", "filename2"):
            if isinstance(value := getattr(current, name, None), str | bytes | os.PathLike):
                yield os.fsdecode(value)


class _Claims(logging.Filter):
    """The step directories of rtdlm saves, and the filter that drops orbax's copies of their
    failures (see the module docstring for exactly which records)."""

    def __init__(self) -> None:
        super().__init__("rtdlm.ckpt")
        self._lock = threading.Lock()
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._failed: collections.deque[str] = collections.deque(maxlen=_REMEMBERED_FAILURES)
        self._pattern: re.Pattern[str] | None = None
        self._dropped: dict[int, BaseException] = {}  # by id; kept alive so ids stay unique
        self._local = threading.local()

    # -- bookkeeping, called by CheckpointManager --------------------------------------------

    def _rebuild(self) -> None:
        claimed = set(self._in_flight) | set(self._failed)
        dirs = sorted(
            {alias for path in claimed for alias in _aliases(path)}, key=len, reverse=True
        )
        # "<dir>/2" must not claim "<dir>/20": a step number ends where the digits end
        alternatives = "|".join(re.escape(path) + r"(?![0-9])" for path in dirs)
        self._pattern = re.compile(alternatives) if dirs else None

    def start(self, step_dir: str) -> None:
        with self._lock:
            self._in_flight[step_dir] += 1
            with contextlib.suppress(ValueError):  # a retry of a failed step is claimed anew
                self._failed.remove(step_dir)
            self._rebuild()

    def finish(self, step_dir: str, *, failed: bool) -> None:
        """The save's outcome is known; a failed one stays claimed for its late stragglers."""
        with self._lock:
            self._in_flight[step_dir] -= 1
            if self._in_flight[step_dir] <= 0:
                del self._in_flight[step_dir]
            if failed and step_dir not in self._failed:
                self._failed.append(step_dir)
            self._dropped.clear()
            self._rebuild()

    def _remote_claimed(self) -> bool:
        return any(paths.is_remote(path) for path in (*self._in_flight, *self._failed))

    def any_claimed(self) -> bool:
        return bool(self._in_flight or self._failed)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """rtdlm waits on its own save in this thread: whatever orbax raises here, rtdlm
        reports, so orbax's own log records of it on this thread are dropped."""
        previous = getattr(self._local, "waiting", False)
        self._local.waiting = True
        try:
            yield
        finally:
            self._local.waiting = previous

    # -- the filter --------------------------------------------------------------------------

    def filter(self, record: logging.LogRecord) -> bool:
        # asyncio's "exception was never retrieved", when orbax's unread write futures are
        # collected, counts only by naming a claimed step directory: it may fire in any thread
        from_asyncio = record.name == "asyncio"
        if record.levelno < logging.ERROR or not (
            from_asyncio or record.pathname.startswith(_ORBAX_SOURCE)
        ):
            return True
        error = record.exc_info[1] if record.exc_info else None
        with self._lock:
            claimed = not from_asyncio and (
                getattr(self._local, "waiting", False)
                or (error is not None and id(error) in self._dropped)
                or (error is not None and self._pattern is not None and _disk_full(error))
                or (error is not None and self._remote_claimed() and unreachable(error))
            )
            # aiohttp's requests cut short when the bucket went, collected unread
            claimed = claimed or (
                from_asyncio and error is not None and self._remote_claimed() and unreachable(error)
            )
            if not claimed and self._pattern is not None:
                texts = list(_texts(error)) if error is not None else []
                with contextlib.suppress(Exception):  # a record whose args do not format
                    texts.append(record.getMessage())
                claimed = any(self._pattern.search(text) for text in texts)
            if claimed and error is not None:
                self._dropped[id(error)] = error
        return not claimed

    # -- tensorstore's completions on a loop orbax already closed ----------------------------

    def unraisable(self, unraisable: Any) -> None:
        if self.any_claimed() and _is_closed_loop_callback(
            unraisable.exc_value, unraisable.exc_traceback, unraisable.object
        ):
            return
        _previous_unraisablehook(unraisable)


def _is_closed_loop_callback(
    error: BaseException | None, traceback: TracebackType | None, source: object
) -> bool:
    """`loop.call_soon_threadsafe` on a closed loop, reported by tensorstore with no object."""
    if source is not None or not isinstance(error, RuntimeError):
        return False
    if str(error) != "Event loop is closed":
        return False
    names = set()
    while traceback is not None:
        names.add(traceback.tb_frame.f_code.co_name)
        traceback = traceback.tb_next
    return "call_soon_threadsafe" in names


claims = _Claims()
_previous_unraisablehook = sys.unraisablehook
_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Idempotent; called when the first CheckpointManager is made, not on import."""
    global _installed, _previous_unraisablehook
    with _install_lock:
        if _installed:
            return
        logging.getLogger("absl").addFilter(claims)  # orbax logs through absl.logging
        logging.getLogger("asyncio").addFilter(claims)
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = claims.unraisable
        _installed = True


class _ReadOnlyNotices(logging.Filter):
    """orbax warns that a directory opened read-only is read-only (twice per manager): rtdlm
    asked for that, for restores that must write nothing, so it is no news to the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        notice = "read_only=True" in message or message.startswith("Given directory is read only")
        ours = record.pathname.startswith(_ORBAX_SOURCE) and record.levelno == logging.WARNING
        return not (ours and notice)


@contextlib.contextmanager
def read_only_notices() -> Iterator[None]:
    """Drops orbax's read-only notices logged while this context is open."""
    notices, absl = _ReadOnlyNotices(), logging.getLogger("absl")
    absl.addFilter(notices)
    try:
        yield
    finally:
        absl.removeFilter(notices)
