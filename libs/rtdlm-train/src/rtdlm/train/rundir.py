"""One writer per run directory: an OS file lock on a folder, a lease on object storage.

Kubernetes can start a replacement pod while the old one still writes to the same run dir;
without this both train, interleave `steps.jsonl` and overwrite each other's checkpoints. A
lock is freed by the kernel when its holder dies; object storage has no locks, so there the
holder keeps renewing a lease object, and a killed holder's lease is taken over once it has
gone unrenewed for its length.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import tensorstore as ts
from etils import epath

from rtdlm import ckpt

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"
LEASE_FILE = ".lease"


class RunDirError(Exception):
    """A run directory that cannot be used, with the reason and the fix."""


class RunDirUnreachableError(RunDirError):
    """The run dir's object store stopped answering mid-run: not bad input, a fault (exit 1)."""


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
            raise _in_use(self.run_dir, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
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


class RunDirLease:
    """Holds `<run_dir>/.lease` on object storage for the life of the run.

    The lease is created only if absent and renewed every third of `seconds` only if it is
    still the one this holder wrote (tensorstore's conditional writes: S3's If-Match and
    If-None-Match, GCS's generation match). Another trainer takes it over only after it has gone
    unrenewed for `seconds`, and a holder that finds it taken stops at its next step (`check`).
    """

    def __init__(self, run_dir: epath.Path, seconds: float = 60.0) -> None:
        self.run_dir, self.seconds = run_dir, seconds
        self._store: ts.KvStore | None = None
        self._generation = b""
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._me: dict[str, Any] | None = None

    def __enter__(self) -> RunDirLease:
        try:
            self._store = ts.KvStore.open(ckpt.kvstore(f"{self.run_dir}/")).result()
            current = self._store.read(LEASE_FILE).result()
        except Exception as error:  # credentials, endpoint, bucket: tensorstore's one line
            raise RunDirError(
                f"cannot reach run dir {self.run_dir}: {ckpt.one_line(error)}: check the bucket "
                "and the credentials (AWS_* variables, AWS_ENDPOINT_URL, or Google's "
                "application-default credentials)"
            ) from None
        if current.state == "value":
            holder = _holder(current.value)
            if holder.get("expires", 0) > time.time():
                left = holder["expires"] - time.time()
                raise _in_use(
                    self.run_dir,
                    f"{_describe_holder(current.value)} (its lease runs {left:.0f} s more "
                    "unless renewed)",
                )
            log.warning(
                "taking over run dir %s: the lease of %s went unrenewed for %.0f s",
                self.run_dir,
                _describe_holder(current.value),
                time.time() - holder.get("expires", 0) + self.seconds,
            )
        written = self._write(current.stamp.generation)
        if not written:  # another trainer wrote it between our read and our write
            raise _in_use(
                self.run_dir, _describe_holder(self._store.read(LEASE_FILE).result().value)
            )
        self._renewer = threading.Thread(target=self._renew, name="rtdlm-lease", daemon=True)
        self._renewer.start()
        return self

    def _write(self, if_equal: bytes) -> bool:
        if self._store is None:
            raise RunDirError(f"the lease on {self.run_dir} is not held")
        self._me = self._me or _me()  # "since" stays the first write's
        record = self._me | {"expires": time.time() + self.seconds}
        stamp = self._store.write(LEASE_FILE, json.dumps(record), if_equal=if_equal).result()
        if stamp.generation:
            self._generation = stamp.generation
        return bool(stamp.generation)

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if not self._write(self._generation) and self._store is not None:
                    taker = _describe_holder(self._store.read(LEASE_FILE).result().value)
                    self._lost = (
                        f"lost run dir {self.run_dir} to {taker}: it took over the lease "
                        f"(this run left it unrenewed for {self.seconds:.0f} s); this run stops "
                        "without writing more; give each run its own --run-dir"
                    )
                    return
            except Exception as error:  # the network: try again, the lease has slack
                log.warning("could not renew the lease on %s: %s", self.run_dir, error)

    def check(self) -> None:
        """Raises RunDirError once another trainer has taken the run dir over."""
        if self._lost:
            raise RunDirError(self._lost)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._store is not None and not self._lost:
            try:  # only if still ours
                self._store.write(LEASE_FILE, None, if_equal=self._generation).result()
            except Exception as release_error:  # it expires by itself
                log.warning("could not release the lease on %s: %s", self.run_dir, release_error)


def run_dir_guard(run_dir: epath.Path, lease_seconds: float) -> RunDirLock | RunDirLease:
    """The lock for a folder, the lease for object storage."""
    if ckpt.is_remote(run_dir):
        return RunDirLease(run_dir, lease_seconds)
    return RunDirLock(Path(run_dir))


def _me() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _holder(raw: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(raw)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _in_use(run_dir: os.PathLike[str], holder: str) -> RunDirError:
    return RunDirError(
        f"run dir {run_dir} is in use by {holder}: wait for that run to end, or pass another "
        "--run-dir"
    )


def _describe_holder(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"
