"""The two apps end to end, in process: train a few steps, checkpoint, export INT8."""

import socket
from pathlib import Path

import numpy as np
import pytest

from rtdlm_exporter.main import main as exporter
from rtdlm_trainer.main import main as trainer

FAST = ["--max-steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-every", "3"]
FAST += ["--metrics-host", "127.0.0.1", "--metrics-port", "0"]


def test_train_checkpoint_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert trainer(["--preset", "tiny", *FAST, "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "step     0 | held-out loss" in out
    assert "step     3 | loss" in out and "tokens/s" in out
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
    assert "sample: 'The " in out  # text generated with the KV cache after training

    output = tmp_path / "tiny-int8.npz"
    assert (
        exporter(["--checkpoint", str(tmp_path / "run" / "checkpoints"), "--output", str(output)])
        == 0
    )
    assert "exported step 3" in capsys.readouterr().out
    with np.load(output) as weights:
        assert weights["block_0/attn/query/w.int8"].dtype == np.int8
        assert weights["block_0/attn_norm/scale"].dtype == np.float32

    # Nothing is overwritten: the same run dir and the same output are refused.
    assert trainer(["--preset", "tiny", *FAST, "--run-dir", str(tmp_path / "run")]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert (
        exporter(["--checkpoint", str(tmp_path / "run" / "checkpoints"), "--output", str(output)])
        == 2
    )
    assert "pass --force" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "huge"], "unknown preset 'huge'; choose one of tiny, small, medium, large"),
        (["--max-steps", "0"], "train.max_steps must be positive, got 0"),
        (["--peak-flops", "-1"], "peak FLOP/s must be positive, got -1.0"),
        (
            ["--metrics-host", "no-such-host.invalid"],
            "cannot serve metrics on no-such-host.invalid:8000: unknown host "
            "'no-such-host.invalid'; use an address of this machine "
            "such as 0.0.0.0 or 127.0.0.1",
        ),
    ],
)
def test_bad_input_is_one_clear_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert trainer([*args, "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"trainer: error: {message}"
    assert not any(tmp_path.iterdir())


def test_exporter_names_a_missing_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        exporter(["--checkpoint", str(tmp_path / "none"), "--output", str(tmp_path / "x.npz")]) == 2
    )
    assert "no checkpoint directory" in capsys.readouterr().err


def test_trainer_refuses_a_metrics_port_in_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--metrics-host", "127.0.0.1", "--metrics-port", str(port)]
        assert trainer([*args, "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"trainer: error: cannot serve metrics on 127.0.0.1:{port}: the port is already in use; "
        "pick another port (0 picks a free one) or disable the exporter"
    )
    assert not (tmp_path / "run").exists()
