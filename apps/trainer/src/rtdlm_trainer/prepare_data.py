"""`prepare-data`: text files into token shards the trainer reads with `--set data.path=DIR`.

A .txt or .md file is one document; a .jsonl file holds one document per line in its "text"
field; a directory contributes every such file under it, in sorted order. Tokens are UTF-8
bytes (vocabulary 256), or the pieces of a SentencePiece model given with --sentencepiece
(copied beside the shards). Every N-th distinct document is held out for validation, so held-out
text never appears in training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from rtdlm.train.shards import DataError, write_shards
from rtdlm.train.tokenizer import BYTES, sentencepiece

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
    for path in inputs:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise DataError(f"{path}: only {', '.join(SUFFIXES)} files can be read")
            yield path
        else:
            raise DataError(f"{path} does not exist")


def documents(path: Path) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start})") from None
    if path.suffix != ".jsonl":
        yield text
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            document = record["text"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f'{path}:{number} is not a JSON object with a "text" string') from None
        if not isinstance(document, str):
            raise DataError(f'{path}:{number}: "text" must be a string')
        yield document


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.validation_every < 2:
            raise DataError("--validation-every must be at least 2")
        if (args.output / "index.json").exists() and not args.force:
            raise DataError(f"{args.output} already holds shards; pass --force to replace them")
        texts = list(dict.fromkeys(d for f in files(args.inputs) for d in documents(f) if d))
        if len(texts) < args.validation_every:
            raise DataError(
                f"found {len(texts)} distinct non-empty documents; need at least "
                f"{args.validation_every} to hold out one (lower --validation-every)"
            )
        tokenizer = BYTES
        if args.sentencepiece is not None:
            if not args.sentencepiece.is_file():
                raise DataError(f"--sentencepiece {args.sentencepiece} does not exist")
            tokenizer = sentencepiece(args.sentencepiece)
        every = args.validation_every
        splits = {
            "train": [tokenizer.encode(t) for i, t in enumerate(texts) if i % every],
            "validation": [tokenizer.encode(t) for i, t in enumerate(texts) if not i % every],
        }
        index = write_shards(
            args.output, splits, tokenizer.vocab_size, tokenizer.index_entry, args.shard_tokens
        )
        if args.sentencepiece is not None:
            shutil.copyfile(args.sentencepiece, args.output / tokenizer.index_entry["file"])
    except DataError as error:
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
