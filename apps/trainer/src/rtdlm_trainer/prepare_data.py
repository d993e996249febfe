"""`prepare-data`: text files into token shards the trainer reads with `--set data.path=DIR`.

A .txt or .md file is one document; a .jsonl file holds one document per line in its "text"
field; a directory contributes every such file under it, in sorted order. Tokens are UTF-8
bytes (vocabulary 256), or the pieces of a SentencePiece model given with --sentencepiece
(copied beside the shards). Every N-th distinct document is held out for validation. The work
is rtdlm.data.prepare's: it streams, and on any error leaves nothing behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rtdlm.data import BYTES, DataError, sentencepiece
from rtdlm.data.prepare import prepare_shards


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tokenizer = BYTES
        if args.sentencepiece is not None:
            if not args.sentencepiece.is_file():
                raise DataError(f"--sentencepiece {args.sentencepiece} does not exist")
            tokenizer = sentencepiece(args.sentencepiece)
        index = prepare_shards(
            args.inputs,
            args.output,
            tokenizer,
            args.validation_every,
            args.shard_tokens,
            args.force,
        )
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
