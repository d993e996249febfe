"""`prepare-data`: documents into token shards the trainer reads with `--set data.path=DIR`.

Inputs are files, directories and glob patterns: .txt and .md files (one document each),
.jsonl, .jsonl.gz and .jsonl.zst (one per line, in --text-field) and .parquet (one per row of
--text-field). Tokens are UTF-8 bytes (vocabulary 256) unless --sentencepiece or --tokenizer
names a model, or --train-tokenizer bpe trains one on the corpus; the tokenizer is kept beside
the shards. Every N-th distinct document is held out for validation. The work is
rtdlm.data.prepare's: it streams, encodes on every core, and on any error leaves nothing behind.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tqdm import tqdm

from rtdlm.ckpt import local_path
from rtdlm.data import BYTES, DataError, Tokenizer, huggingface, sentencepiece
from rtdlm.data.prepare import Progress, prepare_shards


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prepare-data", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=local_path, help="files, directories or globs")
    parser.add_argument("--output", type=local_path, required=True, help="directory for the shards")
    parser.add_argument("--text-field", default="text", help="JSON key or parquet column")
    parser.add_argument("--validation-every", type=int, default=10, help="hold out every N-th")
    parser.add_argument(
        "--shard-tokens", type=int, default=100_000_000, help="tokens per shard file"
    )
    tokenizers = parser.add_mutually_exclusive_group()
    tokenizers.add_argument("--sentencepiece", type=local_path, help="a SentencePiece .model file")
    tokenizers.add_argument("--tokenizer", type=local_path, help="a Hugging Face tokenizer.json")
    tokenizers.add_argument(
        "--train-tokenizer", choices=["bpe"], help="train a byte-level BPE on the corpus"
    )
    parser.add_argument("--vocab-size", type=int, help="the trained tokenizer's vocabulary")
    parser.add_argument("--force", action="store_true", help="replace shards in --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def tokenizer_of(args: argparse.Namespace) -> Tokenizer:
    if (args.train_tokenizer is None) != (args.vocab_size is None):
        raise DataError("--train-tokenizer bpe and --vocab-size N go together")
    for flag, path, load in (
        ("--sentencepiece", args.sentencepiece, sentencepiece),
        ("--tokenizer", args.tokenizer, huggingface),
    ):
        if path is not None:
            if not path.is_file():
                raise DataError(f"{flag} {path} does not exist")
            return load(path)
    return BYTES


class Bar:
    """prepare_shards' progress as a tqdm bar: text MB/s, and documents and tokens/s."""

    def __init__(self, enabled: bool) -> None:
        self._bar: tqdm[Any] = tqdm(
            unit="B",
            unit_scale=True,
            disable=not (enabled and sys.stderr.isatty()),  # a bar on a terminal only
            file=sys.stderr,
            desc="prepare",
        )

    def __call__(self, progress: Progress) -> None:
        bar = self._bar
        bar.update(progress.text_bytes - bar.n)
        elapsed = bar.format_dict["elapsed"] or 1e-9
        bar.set_postfix_str(
            f"{progress.documents:,} docs, {progress.tokens:,} tokens, "
            f"{progress.tokens / elapsed:,.0f} tokens/s"
        )

    def close(self) -> None:
        self._bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bar = Bar(enabled=not args.no_progress)
    try:
        index = prepare_shards(
            args.inputs,
            args.output,
            tokenizer_of(args),
            args.validation_every,
            args.shard_tokens,
            args.force,
            text_field=args.text_field,
            train_bpe_vocab=args.vocab_size,
            progress=bar,
        )
    except (DataError, OSError) as error:  # OSError: an unreadable input, a full disk
        bar.close()
        print(f"prepare-data: error: {error}", file=sys.stderr)
        return 2
    bar.close()
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
