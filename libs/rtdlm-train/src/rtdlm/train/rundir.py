"""One writer per run directory: an OS file lock, so a crashed or killed holder frees it.

Kubernetes can start a replacement pod while the old one still writes to the same volume;
without this both train, interleave `steps.jsonl` and overwrite each other's checkpoints.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from types import TracebackType

LOCK_FILE = ".lock"


class RunDirError(Exception):
    """A run directory that cannot be used, with the reason and the fix."""


class RunDirLock:
    """Holds `<run_dir>/.lock` with flock(2) for the life of the run; the file names the holder
    (pid, host, since) for whoever is refused."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"run dir {self.run_dir} is a file: pass a directory path")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunDirError(f"cannot create run dir {self.run_dir}: {error.strerror}") from None
        path = self.run_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:  # a read-only mount, a folder owned by someone else
            raise RunDirError(
                f"cannot write to run dir {self.run_dir}: {error.strerror}: make it writable "
                "(is it mounted read-only?) or pass another --run-dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunDirError(
                f"run dir {self.run_dir} is in use by {holder}: wait for that run to end, "
                "or pass another --run-dir"
            ) from None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays, naming the last holder
            self._fd = None


def _describe_holder(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"
