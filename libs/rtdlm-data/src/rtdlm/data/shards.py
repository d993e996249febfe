"""The on-disk token format: what `prepare-data` writes and the trainer reads.

    <dir>/index.json
        {"format": "rtdlm-token-shards", "version": 1,
         "tokenizer": {"kind": "bytes"} or {"kind": "sentencepiece", "file": ..., "sha256": ...},
         "vocab_size": 256, "dtype": "uint8",
         "splits": {"train": [SHARD, ...], "validation": [SHARD, ...]}}
        SHARD = {"tokens": "train-00000.tokens.npy", "offsets": "train-00000.offsets.npy",
                 "num_tokens": N, "num_documents": D, "sha256": {"tokens": ..., "offsets": ...}}
    <dir>/<split>-NNNNN.tokens.npy    every document's tokens back to back (dtype above)
    <dir>/<split>-NNNNN.offsets.npy   int64, D + 1 document start offsets (0 first, N last)

Plain .npy arrays (no pickles, memory-mapped), so any pipeline that can write numpy arrays and
JSON can produce shards. Opening a split reads only headers and offsets, so start-up does not
grow with the corpus: a missing file, an unreadable header, a file whose size is not what its
header says (truncated or extended), or counts that disagree with index.json fail at once. The
SHA-256s are checked lazily: a shard's two files are hashed once, the first time any of its
documents is read, so a flipped byte fails before its tokens are used, naming the file.
`verify(corpus)` (or `open_split(..., verify=True)`) hashes every shard up front instead.

`ShardWriter` writes one split a document at a time (memory: one document plus the shard's
offsets); `write_index` then publishes the shards atomically.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import mmap
import os
import threading
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from rtdlm.data import remote
from rtdlm.data.remote import RemoteArray

FORMAT = "rtdlm-token-shards"
SPLITS = ("train", "validation")
KINDS = ("tokens", "offsets")


class DataError(ValueError):
    """Unusable data, named with the fix."""


def _corrupt(path: object, why: str = "SHA-256 differs from index.json") -> DataError:
    return DataError(
        f"shard file {path} is corrupt ({why}): rerun prepare-data or restore the file"
    )


def _sha256(data: mmap.mmap) -> str:
    """Hashes the mapped bytes themselves, so what is checked is exactly what is read (a file
    replaced on disk after opening cannot pass for the one in use). Releases the GIL."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class ShardCheck:
    """One shard's deferred SHA-256 check: hashed once, from any thread, on first use (`lazy`)
    or when `run` (`verify`) asks; a failure sticks, so every later read of the shard fails the
    same way. `files` are (name, a function returning the SHA-256, the one index.json holds)."""

    def __init__(
        self, files: Sequence[tuple[str, Callable[[], str], str]], lazy: bool = True
    ) -> None:
        self._pending = tuple(files)
        self._lazy = lazy
        self._error: str | None = None
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return not self._pending

    def __call__(self) -> None:
        if self._pending and self._lazy:
            self.run()
        if self._error is not None:
            raise DataError(self._error)

    def run(self) -> None:
        if self._pending:  # unlocked fast path once checked: the GIL orders these reads
            with self._lock:
                for name, sha256, expected in self._pending:
                    if sha256() != expected:
                        self._error = str(_corrupt(name))
                        break
                self._pending = ()
        if self._error is not None:
            raise DataError(self._error)


@dataclass(frozen=True)
class Corpus:
    """Documents stored as shards of (tokens back to back, start offsets); tokens may be
    memory-mapped or in a bucket (RemoteArray), so a corpus larger than memory costs only its
    offsets. `checks`, when given, holds each part's integrity check, run before the part's
    first document is returned."""

    parts: tuple[tuple[np.ndarray | RemoteArray, np.ndarray], ...]
    checks: tuple[ShardCheck, ...] = ()

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(o) for _, o in self.parts] or [np.zeros(0, np.int64)])

    @functools.cached_property
    def _first_doc(self) -> np.ndarray:
        return np.cumsum([0] + [len(o) - 1 for _, o in self.parts])

    @property
    def num_documents(self) -> int:
        return int(self._first_doc[-1])

    @property
    def in_bucket(self) -> bool:
        return any(isinstance(tokens, RemoteArray) for tokens, _ in self.parts)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t, _ in self.parts)

    def document(self, index: int) -> np.ndarray:
        return self.pieces([(index, 0, None)])[0]

    def pieces(self, wanted: Sequence[tuple[int, int, int | None]]) -> list[np.ndarray]:
        """Tokens [lo, hi) of each (document, lo, hi) (hi None: to its end); pieces in a bucket
        are fetched together, in one concurrent batch."""
        out: list[np.ndarray | None] = [None] * len(wanted)
        fetch: list[tuple[int, RemoteArray, int, int]] = []
        for n, (index, lo, hi) in enumerate(wanted):
            part = int(np.searchsorted(self._first_doc, index, side="right")) - 1
            if self.checks:
                self.checks[part]()
            tokens, offsets = self.parts[part]
            local = index - self._first_doc[part]
            start, end = int(offsets[local]), int(offsets[local + 1])
            a, b = start + lo, end if hi is None else min(end, start + hi)
            if isinstance(tokens, RemoteArray):
                fetch.append((n, tokens, a, b))
            else:
                out[n] = tokens[a:b]
        if fetch:
            try:
                got = remote.read_many([(tokens, a, b) for _, tokens, a, b in fetch])
            except OSError as error:  # remote.read_many's one kind of failure
                raise _unreadable(fetch[0][1].url, error) from None
            for (n, *_), piece in zip(fetch, got, strict=True):
                out[n] = piece
        return out  # type: ignore[return-value]  # every slot was filled above


def corpus_from_documents(documents: Iterable[np.ndarray], dtype: Any = np.int32) -> Corpus:
    docs = [np.asarray(d, dtype) for d in documents if len(d)]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    tokens = np.concatenate(docs) if docs else np.zeros(0, dtype)
    return Corpus(((tokens, offsets),))


def verify(corpus: Corpus, threads: int = 4) -> None:
    """Hashes every shard not yet checked now (for a full check before a long run); raises the
    first corrupt file in shard order."""
    pending = [check for check in corpus.checks if not check.done]
    with ThreadPoolExecutor(max(1, min(threads, len(pending)))) as pool:
        for _ in pool.map(ShardCheck.run, pending):
            pass


_verify = verify  # open_split's `verify` flag shadows the name


def smallest_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    """The header np.save writes for a 1-D array, so streamed files match saved ones byte for
    byte. Its length does not depend on `length` (numpy pads the shape for growth, and a 1-D
    header fits in its first 128 bytes anyway), which lets the writer fill it in last."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header,
        {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (length,)},
    )
    return header.getvalue()


class ShardWriter:
    """One split's shards, written a document at a time: tokens go straight to the open shard
    file, so memory holds one document plus the shard's offsets. A shard is closed once it
    holds `shard_tokens` tokens (the document that crosses the limit stays whole)."""

    def __init__(
        self, directory: Path, split: str, vocab_size: int, shard_tokens: int = 100_000_000
    ) -> None:
        self.directory, self.split, self.vocab_size = directory, split, vocab_size
        self.dtype = smallest_dtype(vocab_size)
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.written: list[Path] = []  # every file this writer created, for abort()
        self._file: BinaryIO | None = None
        self._offsets = array("q", [0])

    def _files(self) -> dict[str, str]:
        stem = f"{self.split}-{len(self.shards):05d}"
        return {kind: f"{stem}.{kind}.npy" for kind in KINDS}

    def add(self, document: Sequence[int] | np.ndarray) -> None:
        tokens = np.asarray(document)
        if not len(tokens):
            return
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise DataError(f"a document must be a 1-D array of token ids, not {tokens.dtype}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            raise DataError(
                f"token id {low if low < 0 else high} is outside the vocabulary of "
                f"{self.vocab_size}: the tokenizer and vocab_size disagree"
            )
        if self._file is None:
            path = self.directory / self._files()["tokens"]
            self.written.append(path)
            self._file = path.open("wb")
            self._file.write(_npy_header(self.dtype, 0))
        self._file.write(np.ascontiguousarray(tokens, self.dtype).data)
        self._offsets.append(self._offsets[-1] + len(tokens))
        if self._offsets[-1] >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        assert self._file is not None  # nosec B101 # narrows a type; only called while open
        files, num_tokens = self._files(), self._offsets[-1]
        header = _npy_header(self.dtype, num_tokens)
        if len(header) != len(_npy_header(self.dtype, 0)):  # cannot happen for 1-D arrays
            raise RuntimeError("numpy's .npy header length changed with the array length")
        self._file.seek(0)
        self._file.write(header)
        self._file.close()
        self._file = None
        offsets_path = self.directory / files["offsets"]
        self.written.append(offsets_path)
        np.save(offsets_path, np.frombuffer(self._offsets, np.int64), allow_pickle=False)
        self.shards.append(
            {
                **files,
                "num_tokens": num_tokens,
                "num_documents": len(self._offsets) - 1,
                "sha256": {k: sha256_file(self.directory / f) for k, f in files.items()},
            }
        )
        self._offsets = array("q", [0])

    def close(self) -> list[dict[str, Any]]:
        """Finishes the last shard; the split's index entries."""
        if self._file is not None:
            self._flush()
        return self.shards

    def abort(self) -> None:
        """Removes every file this writer wrote."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for path in self.written:
            path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def write_index(
    directory: Path,
    splits: Mapping[str, list[dict[str, Any]]],
    vocab_size: int,
    tokenizer: dict[str, Any],
) -> dict[str, Any]:
    """index.json for shards already in `directory`, replaced atomically: readers see the old
    index or the new one, never half of one."""
    index: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "dtype": smallest_dtype(vocab_size).name,
        "splits": dict(splits),
    }
    temporary = directory / "index.json.tmp"
    temporary.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(temporary, directory / "index.json")
    return index


def write_shards(
    directory: Path,
    splits: Mapping[str, Iterable[np.ndarray]],
    vocab_size: int,
    tokenizer: dict[str, Any],
    shard_tokens: int = 100_000_000,
) -> dict[str, Any]:
    """Writes documents (token arrays) per split into shards of about `shard_tokens` tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[dict[str, Any]]] = {}
    for split, documents in splits.items():
        with ShardWriter(directory, split, vocab_size, shard_tokens) as writer:
            for document in documents:
                writer.add(document)
        written[split] = writer.shards
    return write_index(directory, written, vocab_size, tokenizer)


def _unreadable(url: str, error: BaseException) -> DataError:
    reason = " ".join(str(error).split())[:300] or type(error).__name__
    return DataError(
        f"cannot read {url}: {reason}: check the bucket and the credentials (AWS_* variables, "
        "AWS_ENDPOINT_URL, or Google's application-default credentials)"
    )


def read_index(directory: str | os.PathLike[str], splits: Sequence[str] = SPLITS) -> dict[str, Any]:
    """index.json of a shard directory (a folder, or s3:// or gs:// prefix) holding (at least)
    `splits`."""
    missing_index = DataError(
        f"no index.json in {directory}: point data.path at a directory written by prepare-data"
    )
    if remote.is_remote(directory):
        path: object = f"{os.fspath(directory).rstrip('/')}/index.json"
        try:
            text = remote.read_bytes(str(path)).decode("utf-8", "replace")
        except FileNotFoundError:
            raise missing_index from None
        except (OSError, ValueError) as error:
            raise _unreadable(str(path), error) from None
    else:
        path = Path(directory) / "index.json"
        if not path.is_file():
            raise missing_index
        text = path.read_text()
    try:
        index = json.loads(text)
    except ValueError as error:
        raise DataError(
            f"{path} is not valid JSON ({error}): rewrite it with prepare-data"
        ) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path} is not an {FORMAT} index: write the data with prepare-data")
    missing = [s for s in splits if not index.get("splits", {}).get(s)]
    if missing:
        raise DataError(f"{path} has no {' or '.join(missing)} shards: prepare-data writes both")
    return index


def _header(f: BinaryIO, name: object, size: int) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, where the data starts) of a .npy file whose first bytes
    `f` reads, checked against the file's `size`."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy format version {version} is not supported")
    except ValueError as error:
        raise DataError(f"shard file {name} is unreadable ({error})") from None
    if dtype.hasobject:
        raise DataError(f"shard file {name} is unreadable (it holds Python objects)")
    start = f.tell()
    expected = start + int(np.prod(shape)) * dtype.itemsize
    if size != expected:
        raise _corrupt(name, f"{size:,} bytes where its header needs {expected:,}")
    return shape, fortran_order, dtype, start


def _map(path: Path) -> tuple[np.ndarray, Callable[[], str]]:
    """A .npy file's array, mapped read-only, from its header and size alone (no data is read
    here), and the SHA-256 of the mapped bytes, for its check."""
    if not path.is_file():
        raise DataError(f"shard file {path} is missing: rerun prepare-data")
    with path.open("rb") as f:
        shape, fortran_order, dtype, start = _header(f, path, os.fstat(f.fileno()).st_size)
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    array = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=start)
    return array.reshape(shape, order="F" if fortran_order else "C"), lambda: _sha256(data)


# enough for any .npy header numpy writes for a 1-D array (they are 128 bytes)
_HEADER_BYTES = 4096


def _fetch(url: str, size: int | None, whole: bool) -> tuple[bytes, np.dtype, int, int]:
    """A .npy file in a bucket: its bytes (all of them, or its header's), dtype, where its data
    starts and its length."""
    if size is None:
        raise DataError(f"shard file {url} is missing: rerun prepare-data")
    try:
        data = remote.read_bytes(url, 0, size if whole else min(size, _HEADER_BYTES))
    except (OSError, ValueError) as error:
        raise _unreadable(url, error) from None
    shape, _, dtype, start = _header(io.BytesIO(data), url, size)
    if len(shape) != 1:
        raise DataError(f"shard {url} disagrees with index.json: rerun prepare-data")
    return data, dtype, start, shape[0]


def _fetch_offsets(url: str, size: int | None) -> tuple[np.ndarray, Callable[[], str]]:
    """Read whole: they are small, and every one is needed."""
    data, dtype, start, length = _fetch(url, size, whole=True)
    offsets = np.frombuffer(data, dtype, count=length, offset=start)
    return offsets, lambda: hashlib.sha256(data).hexdigest()


def _fetch_tokens(url: str, size: int | None) -> tuple[RemoteArray, Callable[[], str]]:
    """From the header alone; the SHA-256 streams the file as stored."""
    _, dtype, start, length = _fetch(url, size, whole=False)
    return RemoteArray(url, dtype, start, length), lambda: _sha256_remote(url)


def _sha256_remote(url: str) -> str:
    try:
        return remote.sha256(url)
    except (OSError, ValueError) as error:
        raise _unreadable(url, error) from None


def open_split(
    directory: str | os.PathLike[str],
    split: str,
    index: dict[str, Any] | None = None,
    verify: bool = False,
) -> Corpus:
    """The split's shards, memory-mapped; each is hashed before its first document is read
    (all of them now with verify=True).

    In a bucket (s3://, gs://), each shard's offsets are read and hashed now, its tokens are
    read by range as batches need them, and their hashes are checked only with verify=True,
    which reads every token file once: the store's own checksums guard them otherwise. Sizes
    are checked against the headers and index.json either way."""
    index = index or read_index(directory)
    in_bucket = remote.is_remote(directory)
    root = os.fspath(directory).rstrip("/") if in_bucket else Path(directory)
    try:
        listing = remote.sizes(str(root)) if in_bucket else {}
    except OSError as error:
        raise _unreadable(str(root), error) from None
    parts: list[tuple[np.ndarray | RemoteArray, np.ndarray]] = []
    checks = []
    for number, shard in enumerate(index["splits"][split]):
        try:
            names = {kind: str(shard[kind]) for kind in KINDS}
            digests = {kind: str(shard["sha256"][kind]) for kind in KINDS}
            num_tokens, num_documents = int(shard["num_tokens"]), int(shard["num_documents"])
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"{root}/index.json: {split} shard {number} is malformed: rerun " "prepare-data"
            ) from None
        tokens: np.ndarray | RemoteArray
        if isinstance(root, Path):
            paths: dict[str, object] = {kind: root / name for kind, name in names.items()}
            (tokens, token_hash), (offsets, offset_hash) = (_map(root / names[k]) for k in KINDS)
        else:
            paths = {kind: f"{root}/{name}" for kind, name in names.items()}
            offsets, offset_hash = _fetch_offsets(
                str(paths["offsets"]), listing.get(names["offsets"])
            )
            tokens, token_hash = _fetch_tokens(str(paths["tokens"]), listing.get(names["tokens"]))
        files = [
            (str(paths[kind]), hashes, digests[kind])
            for kind, hashes in zip(KINDS, (token_hash, offset_hash), strict=True)
        ]
        if in_bucket:  # the offsets are in memory already: hashed once, before they are used
            ShardCheck(files[1:]).run()
            files = files[:1]
        check = ShardCheck(files, lazy=not in_bucket)
        consistent = (
            tokens.ndim == 1
            and tokens.dtype.kind in "iu"
            and tokens.dtype.name == index.get("dtype", tokens.dtype.name)
            and len(tokens) == num_tokens
            and offsets.ndim == 1
            and offsets.dtype.kind in "iu"
            and num_documents >= 0
            and len(offsets) == num_documents + 1
        )
        if consistent:
            offsets = np.asarray(offsets, np.int64)  # a view, unless another writer chose int32
            consistent = (
                offsets[0] == 0
                and offsets[-1] == len(tokens)
                and bool(np.all(np.diff(offsets) >= 0))
            )
        if not consistent:
            check.run()  # a corrupt file explains the disagreement better, and names the file
            raise DataError(
                f"shard {paths['tokens']} disagrees with index.json: rerun prepare-data"
            )
        parts.append((tokens, offsets))
        checks.append(check)
    corpus = Corpus(tuple(parts), tuple(checks))
    if verify:
        _verify(corpus)
    return corpus
