"""prepare-data writes shards from text files; the trainer trains on them via data.path."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import SMALL_RUN

from rtdlm.ckpt import restore_params
from rtdlm.data.corpus import stdlib_documents
from rtdlm_exporter.main import main as exporter
from rtdlm_trainer.main import main as trainer
from rtdlm_trainer.prepare_data import main as prepare_data

FAST = [*SMALL_RUN, "--max-steps", "3", "--eval-every", "3", "--metrics-port", "0"]


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    """Real English: some of Python's bundled documentation as .txt files and a .jsonl file."""
    source = tmp_path / "text"
    (source / "nested").mkdir(parents=True)
    documents = [text for _, text in stdlib_documents()[:60]]
    for i, text in enumerate(documents[:40]):
        (source / ("nested" if i % 2 else ".") / f"doc{i:02d}.txt").write_text(text)
    with (source / "more.jsonl").open("w") as f:
        for text in documents[40:]:
            f.write(json.dumps({"text": text}) + "\n")
    (source / "ignored.bin").write_bytes(b"\0\1")
    return source


def test_prepare_then_train_on_the_shards(
    texts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "shards"
    assert prepare_data([str(texts), "--output", str(shards), "--shard-tokens", "20000"]) == 0
    out = capsys.readouterr().out
    assert "train: 53 documents" in out and "validation: 6 documents" in out  # 59 distinct
    index = json.loads((shards / "index.json").read_text())
    assert index["tokenizer"] == {"kind": "bytes"} and index["vocab_size"] == 256
    assert len(index["splits"]["train"]) > 1  # several shard files
    run = ["--run-dir", str(tmp_path / "run"), "--set", f"data.path={shards}"]
    assert trainer([*FAST, *run]) == 0
    assert "done: 3 steps" in capsys.readouterr().out
    # nothing is overwritten without --force
    assert prepare_data([str(texts), "--output", str(shards)]) == 2
    assert "already holds shards; pass --force" in capsys.readouterr().err


def test_a_corrupt_shard_stops_the_trainer_with_its_name(
    texts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "shards"
    assert prepare_data([str(texts), "--output", str(shards)]) == 0
    victim = shards / "train-00000.tokens.npy"
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    run_dir = tmp_path / "run"
    assert trainer([*FAST, "--run-dir", str(run_dir), "--set", f"data.path={shards}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trainer: error: shard file")
    assert "train-00000.tokens.npy is corrupt" in err
    assert len(err.splitlines()) == 1 and not run_dir.exists()


def test_a_sentencepiece_model_tokenizes_and_the_trainer_decodes_with_it(
    texts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(p.read_text() for p in sorted(texts.rglob("*.txt"))))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=500, model_type="bpe"
    )
    shards = tmp_path / "shards"
    model = tmp_path / "sp.model"
    assert prepare_data([str(texts), "--output", str(shards), "--sentencepiece", str(model)]) == 0
    assert "tokenizer sentencepiece, vocabulary 500" in capsys.readouterr().out
    index = json.loads((shards / "index.json").read_text())
    assert index["dtype"] == "uint16" and (shards / "sp.model").is_file()
    run = ["--run-dir", str(tmp_path / "run"), "--set", f"data.path={shards}"]
    assert trainer([*FAST, *run, "--sample-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "vocab_size: 500" in out and "sample: 'The " in out
    # An export carries the tokenizer: it generates with the shards gone, which only a new
    # export (that measures on the run's data) needs.
    artifact = tmp_path / "int8"
    export = ["--checkpoint", str(tmp_path / "run"), "--eval-tokens", "512"]
    assert exporter(["quantize", *export, "--out", str(artifact)]) == 0
    assert (artifact / "sp.model").is_file()
    assert json.loads((artifact / "artifact.json").read_text())["tokenizer"]["file"] == "sp.model"
    shutil.rmtree(shards)
    capsys.readouterr()
    assert (
        exporter(
            ["generate", "--model", str(artifact), "--prompt", "The ", "--max-new-tokens", "5"]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("The ")
    # A new export measures on the run's copy of its first held-out documents (the BPE test
    # below exports so); with that copy gone too, it asks for --data.
    shutil.rmtree(tmp_path / "run" / "data")  # a run from before runs kept one
    assert exporter(["onnx", *export, "--out", str(tmp_path / "onnx")]) == 2
    assert f"the run's data directory {shards} is gone: pass --data DIR" in capsys.readouterr().err
    assert (
        prepare_data([str(texts), "--output", str(tmp_path / "x"), "--sentencepiece", str(corpus)])
        == 2
    )
    assert "is not a SentencePiece model" in capsys.readouterr().err


def test_parquet_to_a_trained_bpe_to_a_model_that_speaks_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    documents = [text for _, text in stdlib_documents()[:120]]
    for part in range(3):
        rows = documents[part::3]
        pq.write_table(
            pa.table({"id": list(range(len(rows))), "content": rows}), corpus / f"{part}.parquet"
        )
    shards = tmp_path / "shards"
    args = [str(corpus / "*.parquet"), "--output", str(shards), "--text-field", "content"]
    assert prepare_data([*args, "--train-tokenizer", "bpe", "--vocab-size", "400"]) == 0
    out = capsys.readouterr().out
    distinct = len({text for text in documents if text})
    assert f"validation: {(distinct + 9) // 10} documents" in out
    assert "tokenizer huggingface, vocabulary 400" in out
    assert (shards / "tokenizer.json").is_file()
    run = ["--run-dir", str(tmp_path / "run"), "--set", f"data.path={shards}"]
    assert trainer([*FAST, *run, "--sample-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "vocab_size: 400" in out and "sample: 'The " in out
    # The run keeps its tokenizer (every checkpoint records it) and first held-out documents:
    # with the data moved away it exports, checked on those, and the artifact speaks BPE.
    entry = json.loads((shards / "index.json").read_text())["tokenizer"]
    assert restore_params(tmp_path / "run" / "checkpoints").config["tokenizer"] == entry
    shards.rename(tmp_path / "moved")
    onnx = tmp_path / "onnx"
    export = ["--checkpoint", str(tmp_path / "run"), "--eval-tokens", "512", "--out", str(onnx)]
    assert exporter(["onnx", *export]) == 0
    assert json.loads((onnx / "artifact.json").read_text())["tokenizer"] == entry
    assert (onnx / "tokenizer.json").read_bytes() == (
        tmp_path / "moved" / "tokenizer.json"
    ).read_bytes()
    capsys.readouterr()
    generate = ["generate", "--model", str(onnx), "--prompt", "The ", "--max-new-tokens", "8"]
    assert exporter(generate) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("The ") and len(printed.strip()) > len("The")
    assert prepare_data([*args, "--train-tokenizer", "bpe"]) == 2
    assert "--train-tokenizer bpe and --vocab-size N go together" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d, "found 0 distinct non-empty documents"),
        (lambda d: (d / "x.jsonl").write_text('{"txt": 1}\n'), "x.jsonl:1 is not a JSON object"),
        (lambda d: (d / "x.txt").write_bytes(b"\xff\xfe"), "x.txt is not UTF-8 text"),
    ],
)
def test_bad_inputs_are_one_clear_line(
    tmp_path: Path, setup: object, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in"
    source.mkdir()
    setup(source)  # type: ignore[operator]
    assert prepare_data([str(source), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_missing_data_path_is_an_input_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert trainer([*FAST, "--run-dir", str(tmp_path / "r"), "--set", "data.path=/no/such"]) == 2
    assert "no index.json in /no/such" in capsys.readouterr().err
