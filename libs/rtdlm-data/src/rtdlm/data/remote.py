"""Shard directories in an S3 or GCS bucket (`s3://bucket/prefix`, `gs://bucket/prefix`).

Nothing there can be memory-mapped, and every read is a round trip, so a token file becomes a
`RemoteArray` whose slices are byte-range reads, and the pipeline asks for all of a batch's
pieces at once (`read_many`: fsspec sends them concurrently). Credentials and endpoints come
from the standard environment (AWS_* variables, AWS_ENDPOINT_URL; Google's
application-default credentials), as s3fs and gcsfs read them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec  # type: ignore[import-untyped]
import numpy as np

SCHEMES = ("s3", "gs")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class _BucketTypeNoise(logging.Filter):
    """gcsfs asks each bucket whether its namespace is hierarchical and, where the credentials
    may not (anonymous reads of a public bucket), warns at every call before using the flat
    API, which is the one shards need."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Could not determine bucket type" not in record.getMessage()


logging.getLogger("gcsfs").addFilter(_BucketTypeNoise())


def is_remote(path: str | os.PathLike[str]) -> bool:
    scheme = _SCHEME.match(os.fspath(path))
    return scheme is not None and scheme.group(1) in SCHEMES


def split(url: str) -> tuple[Any, str]:
    """(filesystem, bucket/key) for an s3:// or gs:// URL. fsspec keeps one filesystem per
    scheme and process (a forked child gets its own), so its connection pool is reused."""
    protocol, _, key = url.partition("://")
    return fsspec.filesystem(protocol), key


@contextlib.contextmanager
def _as_os_error() -> Iterator[None]:
    """botocore's and google-auth's own exceptions (no endpoint, no credentials) as OSError, so
    callers handle one kind of storage failure; s3fs and gcsfs raise OSError for the rest."""
    try:
        yield
    except OSError:
        raise
    except Exception as error:
        raise OSError(f"{type(error).__name__}: {error}") from error


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    fs, key = split(url)
    with _as_os_error():
        return bytes(fs.cat_file(key, start=start, end=end))


def sha256(url: str) -> str:
    """The SHA-256 of a whole object, streamed in 8 MiB reads."""
    fs, key = split(url)
    with _as_os_error(), fs.open(key, "rb", block_size=8 << 20) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sizes(directory: str) -> dict[str, int]:
    """Every file directly in `directory` and its size, from one listing."""
    fs, key = split(directory.rstrip("/"))
    with _as_os_error():
        listing = fs.ls(key, detail=True, refresh=True)
    return {
        entry["name"].rsplit("/", 1)[-1]: int(entry["size"])
        for entry in listing
        if entry.get("type") == "file"
    }


class RemoteArray:
    """A 1-D array stored in a .npy file on object storage: `array[a:b]` is one range read,
    `read_many` reads many pieces of many arrays in one concurrent batch. Only what the
    pipeline asks of token arrays (length, dtype, contiguous slices) is supported."""

    def __init__(self, url: str, dtype: np.dtype, start: int, length: int) -> None:
        self.url, self.dtype, self._start, self._length = url, np.dtype(dtype), start, length
        self.ndim, self.shape = 1, (length,)

    def __len__(self) -> int:
        return self._length

    def _span(self, lo: int, hi: int) -> tuple[int, int]:
        lo, hi = max(0, min(lo, self._length)), max(0, min(hi, self._length))
        size = self.dtype.itemsize
        return self._start + lo * size, self._start + max(lo, hi) * size

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a RemoteArray reads contiguous slices only")
        lo, hi, _ = key.indices(self._length)
        return read_many([(self, lo, hi)])[0]


def read_many(requests: Sequence[tuple[RemoteArray, int, int]]) -> list[np.ndarray]:
    """Elements [lo, hi) of each array, fetched in one concurrent batch per scheme: a batch of
    rows costs about one round trip, however many documents and shards it spans."""
    spans = [(array, *array._span(int(lo), int(hi))) for array, lo, hi in requests]
    blobs: dict[int, bytes] = {}
    by_scheme: dict[str, list[int]] = {}
    for n, (array, a, b) in enumerate(spans):
        if b > a:
            by_scheme.setdefault(array.url.partition("://")[0], []).append(n)
    for numbers in by_scheme.values():
        keys = [split(spans[n][0].url) for n in numbers]
        fs = keys[0][0]
        with _as_os_error():
            got = fs.cat_ranges(
                [key for _, key in keys],
                [spans[n][1] for n in numbers],
                [spans[n][2] for n in numbers],
            )
            for n, blob in zip(numbers, got, strict=True):
                if isinstance(blob, BaseException):
                    raise blob
                blobs[n] = blob
    out = []
    for n, (array, a, b) in enumerate(spans):
        blob = blobs.get(n, b"")
        if len(blob) != b - a:
            raise OSError(f"{array.url}: read {len(blob)} bytes of {b - a} at byte {a}")
        out.append(np.frombuffer(blob, array.dtype))
    return out
