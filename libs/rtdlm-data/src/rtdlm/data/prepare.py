"""Documents into verified token shards: what `prepare-data` does.

Every N-th distinct document is held out for validation, so held-out text never appears in
training. The corpus streams through: documents are read and deduplicated on a thread (a
16-byte digest each is all that is kept, about 100 bytes with the set's overhead) while this
one encodes the last batch of them on every core and appends it to its split's open shard, so
memory does not grow with the corpus. A BPE to train reads the training documents once first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtdlm.data.pipeline import Prefetch
from rtdlm.data.readers import documents, files
from rtdlm.data.shards import SPLITS, Corpus, DataError, ShardWriter, read_index, write_index
from rtdlm.data.tokenizer import BYTES, Tokenizer, train_bpe

BATCH_BYTES = 2 * 2**20  # text per batch: hundreds of documents for the cores, bounded memory


@dataclass(frozen=True)
class Progress:
    """Where a preparation is, after each batch: for a progress bar's MB/s and tokens/s."""

    text_bytes: int
    documents: int
    tokens: int


def distinct(paths: Iterable[Path], text_field: str = "text") -> Iterator[tuple[str, int]]:
    """Every distinct non-empty document, at its first occurrence, with its UTF-8 size."""
    seen: set[bytes] = set()
    for path in paths:
        for text in documents(path, text_field):
            data = text.encode("utf-8")
            if not data:
                continue
            key = hashlib.blake2b(data, digest_size=16).digest()
            if key not in seen:
                seen.add(key)
                yield text, len(data)


def _batches(texts: Iterator[tuple[str, int]]) -> Iterator[tuple[list[str], int]]:
    batch: list[str] = []
    size = 0
    for text, length in texts:
        batch.append(text)
        size += length
        if size >= BATCH_BYTES:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def write_splits(
    texts: Iterable[tuple[str, int]],
    staging: Path,
    tokenizer: Tokenizer,
    every: int,
    shard_tokens: int,
    progress: Callable[[Progress], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Writes `distinct`'s documents into their splits' shards in `staging`; the i-th (from 0)
    is held out when i % every == 0."""
    writers = {s: ShardWriter(staging, s, tokenizer.vocab_size, shard_tokens) for s in SPLITS}
    count = tokens = size = 0
    ahead = Prefetch(_batches(iter(texts)), depth=1)
    try:
        for batch, batch_size in ahead:
            for ids in tokenizer.documents(batch):
                writers["train" if count % every else "validation"].add(ids)
                count, tokens = count + 1, tokens + len(ids)
            size += batch_size
            if progress is not None:
                progress(Progress(size, count, tokens))
    finally:
        ahead.close()
    if count < every:
        raise DataError(
            f"found {count} distinct non-empty documents; need at least "
            f"{every} to hold out one (lower --validation-every)"
        )
    return {split: writer.close() for split, writer in writers.items()}


def publish(staging: Path, output: Path) -> None:
    """Moves the staged files into `output`. The old index goes first, so a crash part-way
    leaves no index.json (not a usable data set) rather than one naming replaced files; the
    old data set's shard files that the new one does not reuse are removed."""
    old: set[str] = set()
    try:
        for shards in read_index(output)["splits"].values():
            old.update(str(shard[kind]) for shard in shards for kind in ("tokens", "offsets"))
    except (DataError, KeyError, TypeError, AttributeError):
        pass  # no index, or one too broken to name its files: nothing to tidy
    (output / "index.json").unlink(missing_ok=True)
    new = {path.name for path in staging.iterdir()}
    for name in new:
        os.replace(staging / name, output / name)
    for name in old - new:
        if Path(name).name == name:  # only plain names inside output
            (output / name).unlink(missing_ok=True)


def prepare_shards(
    inputs: list[Path],
    output: Path,
    tokenizer: Tokenizer = BYTES,
    validation_every: int = 10,
    shard_tokens: int = 100_000_000,
    force: bool = False,
    *,
    text_field: str = "text",
    train_bpe_vocab: int | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """Every document of `inputs` as verified shards in `output`, the i-th distinct one held
    out when i % validation_every == 0; returns the index.json written. With
    `train_bpe_vocab`, the tokenizer is a byte-level BPE of that size trained on the training
    documents (`tokenizer.json` beside the shards) instead of `tokenizer`. Staged inside
    `output` and published only once everything succeeded: on any error nothing new is left
    behind and an existing data set is untouched (replaced only with `force`)."""
    if validation_every < 2:
        raise DataError("--validation-every must be at least 2")
    if (output / "index.json").exists() and not force:
        raise DataError(f"{output} already holds shards; pass --force to replace them")
    files(inputs)  # every named input checked before anything is written
    created = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".prepare-data-", dir=output))
    except OSError as error:
        raise DataError(f"cannot write to --output {output} ({error.strerror})") from None
    try:
        if train_bpe_vocab is not None:
            texts = distinct(files(inputs), text_field)
            train = (text for i, (text, _) in enumerate(texts) if i % validation_every)
            tokenizer = train_bpe(train, train_bpe_vocab, staging / "tokenizer.json")
        else:
            for file in tokenizer.files:
                shutil.copyfile(file, staging / file.name)
        splits = write_splits(
            distinct(files(inputs), text_field),
            staging,
            tokenizer,
            validation_every,
            shard_tokens,
            progress,
        )
        publish(staging, output)
        index = write_index(output, splits, tokenizer.vocab_size, tokenizer.index_entry)
        staging.rmdir()
        return index
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                output.rmdir()
        raise


HELD_OUT_TOKENS = 65_536  # what a run keeps of its held-out split: exports measure on 16,384


def write_held_out(
    directory: Path, validation: Corpus, tokenizer: Tokenizer, max_tokens: int = HELD_OUT_TOKENS
) -> None:
    """A run's own copy of its data's tokenizer and first held-out documents (at most
    `max_tokens`, at least one document): a shard directory with a validation split only,
    written whole or not at all, so exports need no data directory once it has moved."""
    staging = Path(tempfile.mkdtemp(prefix=".held-out-", dir=directory.parent))
    try:
        writer = ShardWriter(staging, "validation", tokenizer.vocab_size)
        kept = 0
        for i in range(validation.num_documents):
            document = validation.document(i)
            if i and kept + len(document) > max_tokens:
                break
            writer.add(document)
            kept += len(document)
        for file in tokenizer.files:
            shutil.copyfile(file, staging / file.name)
        shards = {"validation": writer.close()}
        write_index(staging, shards, tokenizer.vocab_size, tokenizer.index_entry)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
