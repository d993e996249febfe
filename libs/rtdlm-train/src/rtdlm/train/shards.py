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

Plain .npy arrays (read with allow_pickle=False, memory-mapped), so any pipeline that can
write numpy arrays and JSON can produce shards. Each file's SHA-256 is checked when the shard
is first opened; a mismatch names the file.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "rtdlm-token-shards"
SPLITS = ("train", "validation")


class DataError(ValueError):
    """Unusable data, named with the fix."""


@dataclass(frozen=True)
class Corpus:
    """Documents stored as shards of (tokens back to back, start offsets); tokens may be
    memory-mapped, so a corpus larger than memory costs only its offsets."""

    parts: tuple[tuple[np.ndarray, np.ndarray], ...]

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
    def num_tokens(self) -> int:
        return sum(len(t) for t, _ in self.parts)

    def document(self, index: int) -> np.ndarray:
        part = int(np.searchsorted(self._first_doc, index, side="right")) - 1
        tokens, offsets = self.parts[part]
        local = index - self._first_doc[part]
        return tokens[offsets[local] : offsets[local + 1]]


def corpus_from_documents(documents: Iterable[np.ndarray], dtype: Any = np.int32) -> Corpus:
    docs = [np.asarray(d, dtype) for d in documents if len(d)]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    tokens = np.concatenate(docs) if docs else np.zeros(0, dtype)
    return Corpus(((tokens, offsets),))


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def smallest_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def write_shards(
    directory: Path,
    splits: Mapping[str, Sequence[np.ndarray]],
    vocab_size: int,
    tokenizer: dict[str, Any],
    shard_tokens: int = 100_000_000,
) -> dict[str, Any]:
    """Writes documents (token arrays) per split into shards of about `shard_tokens` tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    dtype = smallest_dtype(vocab_size)
    index: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "splits": {},
    }
    for split, documents in splits.items():
        shards: list[dict[str, Any]] = []
        batch: list[np.ndarray] = []
        size = 0
        for doc in [*documents, None]:
            if doc is not None:
                batch.append(doc)
                size += len(doc)
            if batch and (doc is None or size >= shard_tokens):
                ((tokens, offsets),) = corpus_from_documents(batch, dtype).parts
                stem = f"{split}-{len(shards):05d}"
                files = {"tokens": f"{stem}.tokens.npy", "offsets": f"{stem}.offsets.npy"}
                np.save(directory / files["tokens"], tokens, allow_pickle=False)
                np.save(directory / files["offsets"], offsets, allow_pickle=False)
                shards.append(
                    {
                        **files,
                        "num_tokens": int(len(tokens)),
                        "num_documents": len(offsets) - 1,
                        "sha256": {k: _sha256(directory / f) for k, f in files.items()},
                    }
                )
                batch, size = [], 0
        index["splits"][split] = shards
    (directory / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def read_index(directory: Path) -> dict[str, Any]:
    path = directory / "index.json"
    if not path.is_file():
        raise DataError(
            f"no index.json in {directory}: point data.path at a directory written by prepare-data"
        )
    try:
        index = json.loads(path.read_text())
    except ValueError as error:
        raise DataError(
            f"{path} is not valid JSON ({error}): rewrite it with prepare-data"
        ) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path} is not an {FORMAT} index: write the data with prepare-data")
    missing = [s for s in SPLITS if not index.get("splits", {}).get(s)]
    if missing:
        raise DataError(f"{path} has no {' or '.join(missing)} shards: prepare-data writes both")
    return index


def open_split(directory: Path, split: str, index: dict[str, Any] | None = None) -> Corpus:
    """The split's shards, checksummed and memory-mapped."""
    index = index or read_index(directory)
    parts = []
    for shard in index["splits"][split]:
        arrays = {}
        for kind in ("tokens", "offsets"):
            path = directory / shard[kind]
            if not path.is_file():
                raise DataError(f"shard file {path} is missing: rerun prepare-data")
            if _sha256(path) != shard["sha256"][kind]:
                raise DataError(
                    f"shard file {path} is corrupt (SHA-256 differs from index.json): "
                    "rerun prepare-data or restore the file"
                )
            try:
                arrays[kind] = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as error:
                raise DataError(f"shard file {path} is unreadable ({error})") from None
        tokens, offsets = arrays["tokens"], np.asarray(arrays["offsets"], np.int64)
        consistent = (
            tokens.ndim == 1
            and len(tokens) == shard["num_tokens"]
            and len(offsets) == shard["num_documents"] + 1
            and offsets[0] == 0
            and offsets[-1] == len(tokens)
            and bool(np.all(np.diff(offsets) >= 0))
        )
        if not consistent:
            raise DataError(f"shard {path} disagrees with index.json: rerun prepare-data")
        parts.append((tokens, offsets))
    return Corpus(tuple(parts))
