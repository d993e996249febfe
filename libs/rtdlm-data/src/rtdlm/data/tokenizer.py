"""Tokenizers: UTF-8 bytes (built in, vocabulary 256), a SentencePiece model, any Hugging Face
`tokenizer.json`, or a byte-level BPE trained on your corpus (stored as a `tokenizer.json`).

A document is stored as the tokenizer defines one: its BOS token first and its EOS token last,
where it has them (the byte tokenizer has neither: segment ids alone separate documents). A
prompt starts with BOS; generation stops at EOS; decoding drops special tokens.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rtdlm.data import remote
from rtdlm.data.corpus import (
    BYTE_VOCAB_SIZE,
    Splits,
    decode,
    encode,
    split_documents,
    stdlib_documents,
)
from rtdlm.data.shards import Corpus, DataError, open_split, read_index, sha256_file

# What a trained BPE separates documents with (GPT-2's convention), and the EOS names looked
# for in a tokenizer.json that neither a tokenizer_config.json nor its template defines.
END_OF_TEXT = "<|endoftext|>"
EOS_NAMES = (END_OF_TEXT, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


@dataclass(frozen=True)
class Tokenizer:
    """How text becomes token ids and back. `encode` gives a text's ids alone, `encode_batch`
    many texts' on every core; `document` and `prompt` add the special tokens. `index_entry`
    is what index.json, a run and every export artifact record so a reader rebuilds the same
    one; `files` are what that entry names, copied wherever the entry goes."""

    name: str
    vocab_size: int
    encode: Callable[[str], np.ndarray]
    decode: Callable[[np.ndarray], str]
    index_entry: dict[str, Any]
    files: tuple[Path, ...] = ()
    bos_id: int | None = None
    eos_id: int | None = None
    encode_batch: Callable[[list[str]], list[np.ndarray]] | None = None

    def _wrap(self, ids: np.ndarray, eos: bool) -> np.ndarray:
        head = [] if self.bos_id is None else [self.bos_id]
        tail = [] if self.eos_id is None or not eos else [self.eos_id]
        if not head and not tail:
            return ids
        return np.concatenate([np.asarray(head, np.int32), ids, np.asarray(tail, np.int32)])

    def document(self, text: str) -> np.ndarray:
        """A document's ids as training sees them: BOS, the text, EOS (where defined)."""
        return self._wrap(self.encode(text), eos=True)

    def documents(self, texts: list[str]) -> list[np.ndarray]:
        """`document` of each text, encoded together (in parallel where the library can)."""
        encoded = self.encode_batch(texts) if self.encode_batch else map(self.encode, texts)
        return [self._wrap(ids, eos=True) for ids in encoded]

    def prompt(self, text: str) -> np.ndarray:
        """The ids a generation continues: BOS (where defined), then the text."""
        return self._wrap(self.encode(text), eos=False)


BYTES = Tokenizer("bytes", BYTE_VOCAB_SIZE, encode, decode, {"kind": "bytes"})


def sentencepiece(model_file: Path) -> Tokenizer:
    import sentencepiece as spm

    try:
        processor = spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as error:
        raise DataError(f"{model_file} is not a SentencePiece model ({error})") from None
    bos, eos = processor.bos_id(), processor.eos_id()  # -1 where the model has none
    return Tokenizer(
        f"sentencepiece:{model_file.name}",
        processor.get_piece_size(),
        lambda text: np.asarray(processor.encode(text), np.int32),
        lambda tokens: processor.decode([int(t) for t in tokens]),
        {"kind": "sentencepiece", "file": model_file.name, "sha256": sha256_file(model_file)},
        (model_file,),
        bos if bos >= 0 else None,
        eos if eos >= 0 else None,
        lambda texts: [np.asarray(ids, np.int32) for ids in processor.encode(texts)],
    )


def _special_ids(hf: Any, path: Path) -> tuple[int | None, int | None]:
    """BOS and EOS ids: as a tokenizer_config.json beside the file names them, else as the
    post-processor's template places special tokens around a text, else a known EOS name."""
    config = path.with_name("tokenizer_config.json")
    if config.is_file():
        try:
            settings = json.loads(config.read_text())
        except ValueError as error:
            raise DataError(f"{config} is not JSON ({error})") from None

        def named(key: str) -> int | None:
            token = settings.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            return None if token is None else hf.token_to_id(token)

        return named("bos_token"), named("eos_token")
    spec = json.loads(path.read_text()).get("post_processor") or {}
    template = spec.get("single") if spec.get("type") == "TemplateProcessing" else None
    if template:
        first, last = template[0], template[-1]
        bos = hf.token_to_id(first["SpecialToken"]["id"]) if "SpecialToken" in first else None
        eos = hf.token_to_id(last["SpecialToken"]["id"]) if "SpecialToken" in last else None
        return bos, eos
    return None, next((i for n in EOS_NAMES if (i := hf.token_to_id(n)) is not None), None)


def huggingface(path: Path, specials: tuple[int | None, int | None] | None = None) -> Tokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` library), special tokens included. Its
    (BOS, EOS) ids are `specials` where given (as recorded), else found by `_special_ids`."""
    from tokenizers import Tokenizer as HfTokenizer

    try:
        hf = HfTokenizer.from_file(str(path))
    except Exception as error:  # the library raises a bare Exception on any bad file
        raise DataError(f"{path} is not a Hugging Face tokenizer.json ({error})") from None
    bos_id, eos_id = specials if specials is not None else _special_ids(hf, path)
    entry = {"kind": "huggingface", "file": path.name, "sha256": sha256_file(path)}
    return Tokenizer(
        f"huggingface:{path.name}",
        hf.get_vocab_size(with_added_tokens=True),
        lambda text: np.asarray(hf.encode(text, add_special_tokens=False).ids, np.int32),
        lambda tokens: hf.decode([int(t) for t in tokens], skip_special_tokens=True),
        {**entry, "bos_id": bos_id, "eos_id": eos_id},
        (path,),
        bos_id,
        eos_id,
        lambda texts: [
            np.asarray(e.ids, np.int32) for e in hf.encode_batch(texts, add_special_tokens=False)
        ],
    )


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (the 256 bytes, `<|endoftext|>` as EOS, then
    merges) trained on `texts` as they stream by, saved to `out` (a tokenizer.json). Byte-level:
    every text encodes, and decodes back to itself exactly."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < BYTE_VOCAB_SIZE + 1:
        raise DataError(f"--vocab-size must be at least {BYTE_VOCAB_SIZE + 1}, got {vocab_size}")
    hf = HfTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    hf.save(str(out))
    return huggingface(out, (None, hf.token_to_id(END_OF_TEXT)))


# this process's copies of tokenizer files read from a bucket, removed at its exit
_DOWNLOADS: list[tempfile.TemporaryDirectory[str]] = []


def _downloads() -> Path:
    if not _DOWNLOADS:
        _DOWNLOADS.append(tempfile.TemporaryDirectory(prefix="rtdlm-tokenizer-"))
    return Path(_DOWNLOADS[0].name)


def _tokenizer_file(directory: str | os.PathLike[str], name: str) -> Path:
    """The tokenizer file `name` in `directory`; from a bucket, a local copy (the libraries
    load files, and a run copies it into its own data/)."""
    if not remote.is_remote(directory):
        path = Path(directory) / name
        if not path.is_file():
            raise DataError(f"tokenizer file {path} is missing: rerun prepare-data")
        return path
    url = f"{os.fspath(directory).rstrip('/')}/{name}"
    try:
        data = remote.read_bytes(url)
    except FileNotFoundError:
        raise DataError(f"tokenizer file {url} is missing: rerun prepare-data") from None
    except OSError as error:
        raise DataError(f"cannot read {url}: {error}") from None
    local = _downloads() / name
    local.write_bytes(data)
    return local


def from_index(index: dict[str, Any], directory: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer a shard directory (or a run, or an artifact) records; its file lives in
    `directory` (a folder, or an s3:// or gs:// prefix) and must be the one recorded."""
    entry = index.get("tokenizer") or {}
    kind = entry.get("kind")
    if kind == "bytes":
        return BYTES
    if kind in ("sentencepiece", "huggingface"):
        path = _tokenizer_file(directory, Path(str(entry.get("file"))).name)
        if kind == "sentencepiece":
            tokenizer = sentencepiece(path)
        else:
            tokenizer = huggingface(path, (entry.get("bos_id"), entry.get("eos_id")))
        if tokenizer.index_entry["sha256"] != entry.get("sha256"):  # hashed once, when built
            raise DataError(f"tokenizer file {path} differs from the one the shards were made with")
        return tokenizer
    raise DataError(f"{directory} records an unknown tokenizer {entry!r}")


def load_data(
    path: str | os.PathLike[str] | None, verify: bool = False
) -> tuple[Splits, Tokenizer]:
    """The train and validation splits to train on, and their tokenizer: a prepare-data shard
    directory (a folder, or an s3:// or gs:// prefix; verify: hash every shard now), or with no
    path the built-in corpus (Python's own documentation, bytes)."""
    if path is None:
        return split_documents(stdlib_documents()), BYTES
    if not remote.is_remote(path):
        path = Path(path)
    index = read_index(path)
    splits = Splits(
        open_split(path, "train", index, verify), open_split(path, "validation", index, verify)
    )
    return splits, from_index(index, path)


def load_held_out(directory: str | Path) -> tuple[Corpus, Tokenizer]:
    """A run's own held-out documents and tokenizer (written by prepare.write_held_out)."""
    directory = Path(directory)
    index = read_index(directory, ("validation",))
    return open_split(directory, "validation", index), from_index(index, directory)
