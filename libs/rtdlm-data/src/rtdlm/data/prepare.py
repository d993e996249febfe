"""Documents into verified token shards: what `prepare-data` does.

Every N-th distinct document is held out for validation, so held-out text never appears in
training. The corpus streams through: one document at a time is read, tokenized and written to
its split's open shard, so memory does not grow with the corpus, except for a 16-byte digest
per distinct document (for deduplication, about 100 bytes each with the set's overhead).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rtdlm.data.readers import documents, files
from rtdlm.data.shards import SPLITS, DataError, ShardWriter, read_index, write_index
from rtdlm.data.tokenizer import BYTES, Tokenizer


def write_splits(
    paths: Iterable[Path], staging: Path, tokenizer: Tokenizer, every: int, shard_tokens: int
) -> dict[str, list[dict[str, Any]]]:
    """Streams every distinct non-empty document into its split's shards in `staging`; the
    i-th distinct document (from 0) is held out when i % every == 0."""
    writers = {s: ShardWriter(staging, s, tokenizer.vocab_size, shard_tokens) for s in SPLITS}
    seen: set[bytes] = set()
    for path in paths:
        for text in documents(path):
            if not text:
                continue
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if key in seen:
                continue
            split = "train" if len(seen) % every else "validation"
            seen.add(key)
            writers[split].add(tokenizer.encode(text))
    if len(seen) < every:
        raise DataError(
            f"found {len(seen)} distinct non-empty documents; need at least "
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
) -> dict[str, Any]:
    """Every document of `inputs` as verified shards in `output`, the i-th distinct one held
    out when i % validation_every == 0; returns the index.json written. Staged inside `output`
    and published only once everything succeeded: on any error nothing new is left behind and
    an existing data set is untouched (replaced only with `force`)."""
    if validation_every < 2:
        raise DataError("--validation-every must be at least 2")
    if (output / "index.json").exists() and not force:
        raise DataError(f"{output} already holds shards; pass --force to replace them")
    paths = files(inputs)
    created = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".prepare-data-", dir=output))
    except OSError as error:
        raise DataError(f"cannot write to --output {output} ({error.strerror})") from None
    try:
        splits = write_splits(paths, staging, tokenizer, validation_every, shard_tokens)
        for file in tokenizer.files:
            shutil.copyfile(file, staging / file.name)
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
