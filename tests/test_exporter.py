"""The exporter app on runs of the trainer app: every command, and every bad input as one line
with nothing written."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import SMALL_RUN

from rtdlm_exporter.main import main as exporter
from rtdlm_trainer.main import main as trainer

FAST = [*SMALL_RUN, "--max-steps", "3", "--eval-every", "3", "--no-metrics"]
EVAL = ["--eval-tokens", "2048"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("exporter") / "run"
    assert trainer([*FAST, "--run-dir", str(directory)]) == 0
    return directory


@pytest.fixture(scope="module")
def artifacts(run: Path) -> dict[str, Path]:
    """The three artifacts of `run`, each written by its command (checked in the tests)."""
    out = run.parent / "artifacts"
    paths = {name: out / name for name in ("int8", "onnx", "onnx-int8")}
    for command, path in (
        (["quantize"], paths["int8"]),
        (["onnx"], paths["onnx"]),
        (["onnx", "--int8"], paths["onnx-int8"]),
    ):
        assert exporter([*command, "--checkpoint", str(run), "--out", str(path), *EVAL]) == 0
    return paths


def test_quantize_reports_size_perplexity_and_greedy_text(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "int8"
    args = ["--checkpoint", str(run / "checkpoints"), "--step", "best", "--out", str(out), *EVAL]
    assert exporter(["quantize", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("quantized step 3: 328,448 -> 87,040 bytes (3.77x smaller)")
    assert lines[1].startswith("held-out perplexity (2,048 tokens): float32 ")
    assert "limit 2.00%" in lines[1]
    assert lines[2].startswith("greedy, float32: '") and lines[3].startswith("greedy, int8:    '")
    assert "tokens agree" in lines[3] and lines[4] == f"written to {out}"
    manifest = json.loads((out / "artifact.json").read_text())
    assert manifest["source"]["step"] == 3 and manifest["tokenizer"] == {"kind": "bytes"}
    assert manifest["model"]["seq_len"] == 32 and manifest["quality"]["eval_tokens"] == 2048


def test_onnx_export_reports_its_checks(
    artifacts: dict[str, Path], run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--checkpoint", str(run), "--onnx", str(artifacts["onnx"]), *EVAL]
    assert exporter(["verify", *args]) == 0
    out = capsys.readouterr().out
    assert "ONNX float32, opset 17, step 3" in out and "(limit 1e-04)" in out
    assert "greedy: 16 of 16 tokens as rtdlm.model.generate" in out
    assert "onnx.checker full check: decode.onnx" in out and "verified against step 3" in out
    args = ["--checkpoint", str(run), "--onnx", str(artifacts["onnx-int8"]), *EVAL]
    assert exporter(["verify", *args]) == 0
    out = capsys.readouterr().out
    assert "ONNX INT8, opset 17" in out and "ONNX INT8 " in out and "limit 2.00%" in out


@pytest.mark.parametrize("name", ["int8", "onnx", "onnx-int8"])
def test_generate_runs_each_artifact(
    name: str, artifacts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--model", str(artifacts[name]), "--prompt", "The ", "--max-new-tokens", "12"]
    assert exporter(["generate", *args]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text.startswith("The ") and len(text.encode()) >= 4 + 4  # bytes may merge into chars
    assert exporter(["generate", *args, "--temperature", "0.8", "--top-k", "40"]) == 0
    assert exporter(["generate", *args, "--temperature", "0.8", "--top-p", "0.9"]) == 0


def expect_error(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], code: int = 2
) -> None:
    assert exporter(args) == code
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_bad_input_is_one_line_and_writes_nothing(
    run: Path,
    artifacts: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = str(tmp_path / "out")
    monkeypatch.chdir(tmp_path)  # where pathlib would put a URL's "s3:" folder
    for args in (["--checkpoint", "hdfs://bucket/run", "--out", out], ["--out", "s3://b/int8"]):
        with pytest.raises(SystemExit) as ended:  # argparse's usage error
            exporter(["quantize", "--checkpoint", str(run), *args])
        assert ended.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert (
            error.startswith("exporter quantize: error: argument --") and " is a URL, and " in error
        )
    expect_error(
        ["quantize", "--checkpoint", str(tmp_path / "none"), "--out", out],
        "exporter: error: no checkpoint directory at",
        capsys,
    )
    expect_error(
        ["onnx", "--checkpoint", str(run), "--step", "9", "--out", out],
        "no checkpoint for step 9 in ",
        capsys,
    )
    expect_error(
        ["quantize", "--checkpoint", str(run), "--out", str(artifacts["onnx"])],
        f"exporter: error: {artifacts['onnx']} exists; pass --force to replace it",
        capsys,
    )
    expect_error(
        ["generate", "--model", str(artifacts["onnx"]), "--prompt", "x" * 30],
        "the prompt (30 tokens) plus 64 new tokens exceeds the model's context of 32 tokens",
        capsys,
    )
    expect_error(
        ["generate", "--model", str(run), "--prompt", "x"],
        "is not an rtdlm export artifact (no artifact.json)",
        capsys,
    )
    expect_error(
        ["verify", "--checkpoint", str(run), "--onnx", str(artifacts["int8"])],
        "is a 'jax-int8' artifact (format 1), not 'onnx'",
        capsys,
    )
    expect_error(  # the INT8 model cannot be 1% better than float32: the check fails
        ["quantize", "--checkpoint", str(run), "--out", out, "--max-ppl-increase", "-1", *EVAL],
        "exporter: check failed: INT8 held-out perplexity",
        capsys,
        code=1,
    )
    assert not any(tmp_path.iterdir())
    assert sorted(p.name for p in artifacts["onnx"].parent.iterdir()) == sorted(artifacts)


def test_a_corrupt_checkpoint_or_artifact_is_refused(
    run: Path, artifacts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken_run = tmp_path / "run"
    shutil.copytree(run, broken_run)
    for path in (broken_run / "checkpoints").rglob("*"):
        if path.is_file() and "/params/" in str(path):
            path.write_bytes(b"garbage")
    expect_error(
        ["quantize", "--checkpoint", str(broken_run), "--out", str(tmp_path / "out")],
        "exporter: error: no intact checkpoint in ",
        capsys,
    )
    broken = tmp_path / "onnx"
    shutil.copytree(artifacts["onnx"], broken)
    data = broken / "weights.onnx.data"
    data.write_bytes(data.read_bytes()[:-1] + b"\1")
    expect_error(
        ["generate", "--model", str(broken), "--prompt", "x"],
        "onnx is corrupt: weights.onnx.data does not match its XXH3-128 digest; export it again",
        capsys,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "run"]


def test_an_artifact_of_another_model_config_is_refused(
    artifacts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    assert trainer([*FAST, "--set", "model.d_ff=512", "--run-dir", str(other)]) == 0
    capsys.readouterr()
    expect_error(
        ["verify", "--checkpoint", str(other), "--onnx", str(artifacts["onnx"]), *EVAL],
        "was exported from another model config than the checkpoint's (d_ff: None vs 512)",
        capsys,
    )
