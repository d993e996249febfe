"""prepare-data's throughput against bare `tokenizers` batch encoding, and its peak memory.

Run: ./pants run libs/rtdlm-data/benchmarks:bench -- [--mb 256] [--rounds 3] [--rss-gb 1]

The corpus is English (CPython's bundled documentation, numbered so every document is distinct)
as .jsonl files; the tokenizer a byte-level BPE of 8,192 tokens trained on a sample of it. Each
round times, alternately on the same text, (A) the `tokenizers` library encoding every document
with `encode_batch` from memory, and (B) `prepare_shards` end to end: reading the files,
deduplicating, encoding, writing and publishing verified shards. Machine speed drifts between
runs, so the figure is B's MB/s over A's, per round and as the median. With --rss-gb, prepare-data
then runs in a process of its own on a corpus of that size, and its peak RSS is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess  # nosec B404 # times prepare-data in a process of its own
import sys
import tempfile
import time
from pathlib import Path

from rtdlm.data import huggingface, stdlib_documents, train_bpe
from rtdlm.data.prepare import BATCH_BYTES, prepare_shards


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def write_corpus(directory: Path, size: int) -> list[Path]:
    """About `size` bytes of distinct documents in .jsonl files of 64 MB."""
    topics = [text for _, text in stdlib_documents() if text]
    directory.mkdir(parents=True)
    paths: list[Path] = []
    number = written = 0
    while written < size:
        path = directory / f"part{len(paths):04d}.jsonl"
        with path.open("w") as f:
            while f.tell() < 64 * 2**20 and written + f.tell() < size:
                text = f"Document {number}.\n\n{topics[number % len(topics)]}"
                f.write(json.dumps({"text": text}) + "\n")
                number += 1
            written += f.tell()
        paths.append(path)
    return paths


def texts_of(paths: list[Path]) -> list[str]:
    return [json.loads(line)["text"] for path in paths for line in path.open()]


def bare(tokenizer_json: Path, texts: list[str]) -> float:
    """Seconds for `tokenizers` alone to encode every text, in batches as prepare-data does."""
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tokenizer_json))
    start = time.perf_counter()
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= BATCH_BYTES:
            hf.encode_batch(batch, add_special_tokens=False)
            batch, size = [], 0
    hf.encode_batch(batch, add_special_tokens=False)
    return time.perf_counter() - start


def end_to_end(paths: list[Path], tokenizer_json: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    prepare_shards(paths, out, huggingface(tokenizer_json))
    return time.perf_counter() - start


def peak_rss(paths: list[Path], tokenizer_json: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of prepare-data in a fresh process."""
    code = (
        "import sys; from pathlib import Path; from rtdlm.data import huggingface;"
        "from rtdlm.data.prepare import prepare_shards;"
        "prepare_shards([Path(p) for p in sys.argv[3:]], Path(sys.argv[1]),"
        " huggingface(Path(sys.argv[2])))"
    )
    start = time.perf_counter()
    subprocess.run(  # nosec B603 # this interpreter, no shell
        [sys.executable, "-c", code, str(out), str(tokenizer_json), *map(str, paths)],
        check=True,
    )
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=256, help="corpus size for the A/B rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss-gb", type=float, default=0, help="corpus size for peak RSS")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        root = Path(tmp)
        paths = write_corpus(root / "corpus", int(args.mb * 2**20))
        size = sum(p.stat().st_size for p in paths)
        tokenizer_json = root / "tokenizer.json"
        train_bpe(iter(texts_of(paths[:1])[:5000]), args.vocab_size, tokenizer_json)
        texts = texts_of(paths)
        text_mb = sum(len(t.encode()) for t in texts) / 1e6
        print(f"{cpu_model()} | corpus {size / 1e6:,.0f} MB of .jsonl, {text_mb:,.0f} MB of text")
        ratios = []
        for round_ in range(args.rounds):
            a = bare(tokenizer_json, texts)
            b = end_to_end(paths, tokenizer_json, root / "shards")
            ratios.append(a / b)
            print(
                f"round {round_ + 1}: tokenizers encode_batch {text_mb / a:,.1f} MB/s | "
                f"prepare-data end to end {text_mb / b:,.1f} MB/s | ratio {a / b:.2f}"
            )
        print(f"prepare-data / bare tokenizers: median {statistics.median(ratios):.2f} (goal 0.8)")
        del texts
        if args.rss_gb:
            shutil.rmtree(root / "shards", ignore_errors=True)
            big = write_corpus(root / "big", int(args.rss_gb * 2**30))
            seconds, rss = peak_rss(big, tokenizer_json, root / "big-shards")
            gb = sum(p.stat().st_size for p in big) / 1e9
            print(
                f"{gb:,.2f} GB corpus: prepare-data {gb * 1e3 / seconds:,.1f} MB/s, "
                f"peak RSS {rss / 2**30:.2f} GiB (goal under 2 GB)"
            )


if __name__ == "__main__":
    main()
