"""`prepare-data`: text files into token shards the trainer reads with `--set data.path=DIR`.

A .txt or .md file is one document; a .jsonl file holds one document per line in its "text"
field; a directory contributes every such file under it, in sorted order. Tokens are UTF-8
bytes (vocabulary 256), or the pieces of a SentencePiece model given with --sentencepiece
(copied beside the shards). Every N-th distinct document is held out for validation, so held-out
text never appears in training.

The corpus streams through: one document at a time is read, tokenized and written to its
split's open shard, so memory does not grow with the corpus, except for a 16-byte digest per
distinct document (for deduplication, about 100 bytes each with the set's overhead). Shards are
written into a staging directory inside --output and moved into place only once everything
has succeeded; on any error nothing new is left behind and an existing data set is untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rtdlm.train.shards import SPLITS, DataError, ShardWriter, read_index, write_index
from rtdlm.train.tokenizer import BYTES, Tokenizer, sentencepiece

SUFFIXES = (".txt", ".md", ".jsonl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prepare-data", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help=".txt/.md/.jsonl files or dirs")
    parser.add_argument("--output", type=Path, required=True, help="directory for the shards")
    parser.add_argument("--validation-every", type=int, default=10, help="hold out every N-th")
    parser.add_argument(
        "--shard-tokens", type=int, default=100_000_000, help="tokens per shard file"
    )
    parser.add_argument(
        "--sentencepiece", type=Path, default=None, help="a SentencePiece .model file"
    )
    parser.add_argument("--force", action="store_true", help="replace shards in --output")
    return parser.parse_args(argv)


def files(inputs: list[Path]) -> Iterator[Path]:
    """Every input file, in order. The named inputs are checked now, before anything is
    written; directories are walked lazily."""
    for path in inputs:
        if path.is_file() and path.suffix not in SUFFIXES:
            raise DataError(f"{path}: only {', '.join(SUFFIXES)} files can be read")
        if not path.exists():
            raise DataError(f"{path} does not exist")
    return _walk(inputs)


def _walk(inputs: list[Path]) -> Iterator[Path]:
    for path in inputs:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        else:
            yield path


def _decode(path: Path, data: bytes, start: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {start + error.start})") from None


def documents(path: Path) -> Iterator[str]:
    """The file's documents, one at a time: a .jsonl file is read line by line."""
    if path.suffix != ".jsonl":
        try:
            yield path.read_text(encoding="utf-8")  # text mode: \r\n becomes \n, as before
        except UnicodeDecodeError as error:
            raise DataError(f"{path} is not UTF-8 text (byte {error.start})") from None
        return
    with path.open("rb") as f:
        start = 0
        for number, raw in enumerate(f, 1):
            line = _decode(path, raw, start)
            start += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                document = record["text"]
            except (ValueError, KeyError, TypeError):
                raise DataError(
                    f'{path}:{number} is not a JSON object with a "text" string'
                ) from None
            if not isinstance(document, str):
                raise DataError(f'{path}:{number}: "text" must be a string')
            try:
                document.encode("utf-8")
            except UnicodeEncodeError:  # JSON can escape a lone surrogate (\ud800)
                raise DataError(f'{path}:{number}: "text" is not valid Unicode') from None
            yield document


def write_splits(
    paths: Iterator[Path], staging: Path, tokenizer: Tokenizer, every: int, shard_tokens: int
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


def prepare(args: argparse.Namespace, tokenizer: Tokenizer) -> dict[str, Any]:
    paths = files(args.inputs)
    created = not args.output.exists()
    try:
        args.output.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".prepare-data-", dir=args.output))
    except OSError as error:
        raise DataError(f"cannot write to --output {args.output} ({error.strerror})") from None
    try:
        splits = write_splits(paths, staging, tokenizer, args.validation_every, args.shard_tokens)
        if args.sentencepiece is not None:
            shutil.copyfile(args.sentencepiece, staging / tokenizer.index_entry["file"])
        publish(staging, args.output)
        index = write_index(args.output, splits, tokenizer.vocab_size, tokenizer.index_entry)
        staging.rmdir()
        return index
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                args.output.rmdir()
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.validation_every < 2:
            raise DataError("--validation-every must be at least 2")
        if (args.output / "index.json").exists() and not args.force:
            raise DataError(f"{args.output} already holds shards; pass --force to replace them")
        tokenizer = BYTES
        if args.sentencepiece is not None:
            if not args.sentencepiece.is_file():
                raise DataError(f"--sentencepiece {args.sentencepiece} does not exist")
            tokenizer = sentencepiece(args.sentencepiece)
        index = prepare(args, tokenizer)
    except (DataError, OSError) as error:  # OSError: an unreadable input, a full disk
        print(f"prepare-data: error: {error}", file=sys.stderr)
        return 2
    for split, shards in index["splits"].items():
        print(
            f"{split}: {sum(s['num_documents'] for s in shards):,} documents, "
            f"{sum(s['num_tokens'] for s in shards):,} tokens in {len(shards)} shard(s)"
        )
    print(
        f"tokenizer {index['tokenizer']['kind']}, vocabulary {index['vocab_size']:,}; wrote "
        f"{args.output / 'index.json'}; train with --set data.path={args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
