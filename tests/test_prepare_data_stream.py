"""prepare-data streams: memory stays bounded however large the corpus, a failed run leaves
nothing behind, and a corrupt shard it wrote fails before its tokens reach a batch.

Kept apart from test_prepare_data.py, which needs the trainer; these need only prepare-data."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rtdlm.data.corpus import stdlib_documents
from rtdlm.data.pipeline import Prefetch, packed_batches
from rtdlm.data.shards import DataError, open_split, read_index
from rtdlm_trainer.prepare_data import main as prepare_data

LIMITED = """
import re, resource, sys

from rtdlm_trainer.prepare_data import main


def vm(key):
    status = open("/proc/self/status").read()
    return int(re.search(key + r":\\s+(\\d+) kB", status).group(1)) * 1024


headroom, argv = int(sys.argv[1]), sys.argv[2:]
baseline = vm("VmSize")  # after the imports
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (baseline + headroom, hard))
try:
    code = main(argv)
finally:
    print(f"baseline={baseline} limit={baseline + headroom} peak={vm('VmPeak')}", file=sys.stderr)
sys.exit(code)
"""


def generate(directory: Path, size: int) -> tuple[list[Path], list[str]]:
    """Real English (Python's bundled docs), numbered so documents are distinct, with some
    repeated: .jsonl files of about 16 MB and a directory of .txt files. Returns the inputs
    and the distinct documents in the order prepare-data reads them."""
    topics = [text for _, text in stdlib_documents()]
    directory.mkdir()
    inputs: list[Path] = []
    distinct: dict[str, None] = {}
    number, written = 0, 0
    while written < size:
        path = directory / f"part{len(inputs):03d}.jsonl"
        with path.open("w") as f:
            while f.tell() < 16 * 2**20 and written + f.tell() < size:
                text = f"Document {number}.\n\n{topics[number % len(topics)]}"
                if number % 7 == 3:  # a repeat of an earlier document, dropped
                    text = next(iter(distinct))
                else:
                    distinct[text] = None
                f.write(json.dumps({"text": text, "id": number}) + "\n")
                number += 1
            written += f.tell()
        inputs.append(path)
    texts = directory / "texts"
    texts.mkdir()
    for i, topic in enumerate(topics[:20]):
        (texts / f"{i:02d}.txt").write_text(topic)
        distinct[topic] = None
    return [*inputs, texts], list(distinct)


def run_limited(pythonpath: list[str], headroom: int, argv: list[str]) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in pythonpath if p)}
    # One malloc arena: the arena glibc gives prepare-data's reader thread reserves 64 MB of
    # address space it never touches, and the limit below is on address space.
    env["MALLOC_ARENA_MAX"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", LIMITED, str(headroom), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.returncode, result.stderr


HEADROOM = 64 * 2**20  # above the imports' baseline; far below the corpus (and its tokens)
CORPUS = 160 * 2**20


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_a_corpus_larger_than_the_memory_limit_prepares(tmp_path: Path) -> None:
    inputs, distinct = generate(tmp_path / "corpus", CORPUS)
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) > 2 * HEADROOM
    shards = tmp_path / "shards"
    argv = [*map(str, inputs), "--output", str(shards), "--shard-tokens", "20000000"]
    code, err = run_limited(sys.path, HEADROOM, argv)
    assert code == 0, err[-3000:]
    baseline, limit, peak = map(int, re.findall(r"=(\d+)", err.splitlines()[-1]))
    assert peak <= limit < baseline + CORPUS
    # every distinct document, once, in order, every 10th held out: the same as in memory
    expected = {
        "train": [t for i, t in enumerate(distinct) if i % 10],
        "validation": [t for i, t in enumerate(distinct) if not i % 10],
    }
    index = read_index(shards)
    assert len(index["splits"]["train"]) > 1
    for split, texts in expected.items():
        corpus = open_split(shards, split, index, verify=True)
        assert corpus.num_documents == len(texts)
        assert corpus.num_tokens == sum(len(t.encode()) for t in texts)
        for i in (0, 1, len(texts) // 2, len(texts) - 1):
            assert corpus.document(i).tobytes() == texts[i].encode()
        digest = hashlib.sha256()
        for i in range(corpus.num_documents):
            digest.update(corpus.document(i).tobytes())
        assert digest.hexdigest() == hashlib.sha256("".join(texts).encode()).hexdigest()


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    source = tmp_path / "text"
    source.mkdir()
    for i, (_, text) in enumerate(stdlib_documents()[:30]):
        (source / f"doc{i:02d}.txt").write_text(text)
    return source


def test_a_flipped_byte_in_a_prepared_shard_fails_before_it_is_batched(
    texts: Path, tmp_path: Path
) -> None:
    shards = tmp_path / "shards"
    assert prepare_data([str(texts), "--output", str(shards), "--shard-tokens", "5000"]) == 0
    victim = shards / "train-00002.tokens.npy"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    train = open_split(shards, "train")  # opening does not read the data
    batches = Prefetch(packed_batches(train, 4, 63, seed=0), depth=2)  # a reader thread
    try:
        with pytest.raises(DataError, match=r"train-00002.tokens.npy is corrupt"):
            for _ in range(train.num_tokens // (4 * 64) + 1):  # at most one epoch
                next(batches)
    finally:
        batches.close()


def test_a_failed_run_leaves_the_old_shards_and_no_staging(
    texts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "shards"
    assert prepare_data([str(texts), "--output", str(shards), "--shard-tokens", "5000"]) == 0
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    (texts / "zz-late.txt").write_bytes(b"fine until \xff here")  # read last: shards are written
    assert prepare_data([str(texts), "--output", str(shards), "--force"]) == 2
    assert "zz-late.txt is not UTF-8 text (byte 11)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before
    # a first run that fails late creates nothing at all
    assert prepare_data([str(texts), "--output", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


def test_force_replaces_the_data_set_and_its_stale_shards(
    texts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "shards"
    assert prepare_data([str(texts), "--output", str(shards), "--shard-tokens", "5000"]) == 0
    assert (shards / "train-00005.tokens.npy").exists()
    (shards / "notes.txt").write_text("mine")
    assert prepare_data([str(texts), "--output", str(shards), "--force"]) == 0
    assert "train: 27 documents, " in capsys.readouterr().out
    assert sorted(p.name for p in shards.iterdir()) == [
        "index.json",
        "notes.txt",
        "train-00000.offsets.npy",
        "train-00000.tokens.npy",
        "validation-00000.offsets.npy",
        "validation-00000.tokens.npy",
    ]


def test_too_few_documents_fail_after_streaming_and_leave_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": f"doc {i % 5}"}) + "\n" for i in range(50)))
    assert prepare_data([str(source), "--output", str(tmp_path / "out")]) == 2
    assert "found 5 distinct non-empty documents; need at least 10" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "ok"}\n\n{"text": "b\xffd"}\n', r"x.jsonl is not UTF-8 text \(byte 27\)"),
        (b'{"text": "ok"}\n\n{"text": 3}\n', r'x.jsonl:3: "text" must be a string'),
        (b'{"text": "ok"}\n{"text": "\\ud800"}\n', r'x.jsonl:2: "text" is not valid Unicode'),
    ],
)
def test_jsonl_errors_name_the_line_or_byte(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    (tmp_path / "x.jsonl").write_bytes(content)
    assert prepare_data([str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and len(err.splitlines()) == 1, err


def test_a_missing_input_is_refused_before_anything_is_written(
    texts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert prepare_data([str(texts), str(tmp_path / "nope.txt"), "--output", str(out)]) == 2
    assert "nope.txt does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_jsonl_lines_are_read_one_at_a_time(tmp_path: Path) -> None:
    """A U+2028 inside a JSON string is one line (the whole-file splitlines split it)."""
    lines = [
        json.dumps({"text": f"line {i}\u2028same line"}, ensure_ascii=False) for i in range(10)
    ]
    (tmp_path / "x.jsonl").write_text("\r\n".join(lines) + "\n", encoding="utf-8")
    assert prepare_data([str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "out")]) == 0
    validation = open_split(tmp_path / "out", "validation")
    assert validation.document(0).tobytes().decode() == "line 0\u2028same line"
