"""Tokenizers: UTF-8 bytes (built in, vocabulary 256) or a SentencePiece model file."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rtdlm.data.corpus import (
    BYTE_VOCAB_SIZE,
    Splits,
    decode,
    encode,
    split_documents,
    stdlib_documents,
)
from rtdlm.data.shards import DataError, open_split, read_index


@dataclass(frozen=True)
class Tokenizer:
    """How text becomes token ids and back. `index_entry` is what index.json (and every export
    artifact) records so a reader rebuilds the same one; `files` are what that entry names (a
    SentencePiece model), copied wherever the entry goes so it stands alone."""

    name: str
    vocab_size: int
    encode: Callable[[str], np.ndarray]
    decode: Callable[[np.ndarray], str]
    index_entry: dict[str, Any]
    files: tuple[Path, ...] = ()


BYTES = Tokenizer("bytes", BYTE_VOCAB_SIZE, encode, decode, {"kind": "bytes"})


def sentencepiece(model_file: Path) -> Tokenizer:
    import sentencepiece as spm

    try:
        processor = spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as error:
        raise DataError(f"{model_file} is not a SentencePiece model ({error})") from None
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    return Tokenizer(
        f"sentencepiece:{model_file.name}",
        processor.get_piece_size(),
        lambda text: np.asarray(processor.encode(text), np.int32),
        lambda tokens: processor.decode([int(t) for t in tokens]),
        {"kind": "sentencepiece", "file": model_file.name, "sha256": digest},
        (model_file,),
    )


def from_index(index: dict[str, Any], directory: Path) -> Tokenizer:
    """The tokenizer a shard directory was written with (its model file lives beside it)."""
    entry = index.get("tokenizer") or {}
    if entry.get("kind") == "bytes":
        return BYTES
    if entry.get("kind") == "sentencepiece":
        path = directory / str(entry.get("file"))
        if not path.is_file():
            raise DataError(f"tokenizer model {path} is missing: rerun prepare-data")
        tokenizer = sentencepiece(path)
        if tokenizer.index_entry["sha256"] != entry.get("sha256"):
            raise DataError(
                f"tokenizer model {path} differs from the one the shards were made with"
            )
        return tokenizer
    raise DataError(f"{directory / 'index.json'} names an unknown tokenizer {entry!r}")


def load_data(path: str | Path | None) -> tuple[Splits, Tokenizer]:
    """The train and validation splits to train on, and their tokenizer: a prepare-data shard
    directory, or with no path the built-in corpus (Python's own documentation, bytes)."""
    if path is None:
        return split_documents(stdlib_documents()), BYTES
    path = Path(path)
    index = read_index(path)
    splits = Splits(open_split(path, "train", index), open_split(path, "validation", index))
    return splits, from_index(index, path)
