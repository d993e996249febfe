"""The trainer app end to end, in process: train a few steps, checkpoint, resume, refuse bad
input (the exporter's side is tests/test_exporter.py)."""

import io
import socket
from pathlib import Path

import pytest
from conftest import SMALL_RUN

from rtdlm_trainer.main import main as trainer

FAST = [*SMALL_RUN, "--max-steps", "3", "--eval-every", "3"]
FAST += ["--metrics-host", "127.0.0.1", "--metrics-port", "0"]


def test_train_checkpoint_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert trainer([*FAST, "--sample-tokens", "16", "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "step     0 | held-out loss" in out
    assert "step     3 | loss" in out and "tokens/s" in out
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
    assert "sample: 'The " in out  # text generated with the KV cache after training

    # The same run dir resumes (here: nothing left to do); --no-resume refuses to touch it.
    assert trainer([*FAST, "--run-dir", str(tmp_path / "run")]) == 0
    assert "nothing to do, step 3 >= train.max_steps" in capsys.readouterr().out
    assert trainer([*FAST, "--no-resume", "--run-dir", str(tmp_path / "run")]) == 2
    assert "already holds checkpoints and resuming is off (--no-resume)" in capsys.readouterr().err


NOT_LOCAL = (
    "is a URL, and this takes a folder on this machine: nothing was read or written; pass a "
    "local or mounted folder (a bucket mounted with s3fs or gcsfuse works)"
)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "huge"], "unknown preset 'huge'; choose one of tiny, small, medium, large"),
        (["--max-steps", "0"], "train.max_steps must be positive, got 0"),
        (["--peak-flops", "-1"], "metrics.peak_flops must be positive, got -1.0"),
        (
            ["--set", "optimizer.lr=1"],
            "unknown key 'optimizer.lr'; valid keys under optimizer are "
            "learning_rate, min_lr_ratio, warmup_steps, decay_steps, weight_decay, b1, b2, eps, "
            "clip_norm",
        ),
        (
            ["--config", "/nonexistent.yaml"],
            "cannot read --config /nonexistent.yaml: " "No such file or directory",
        ),
        (
            ["--metrics-host", "no-such-host.invalid"],
            "cannot serve metrics on no-such-host.invalid:8000: unknown host "
            "'no-such-host.invalid'; use an address of this machine "
            "such as 0.0.0.0 or 127.0.0.1",
        ),
        (
            ["--set", "data.path=hdfs://cluster/shards"],
            "data.path: hdfs://cluster/shards is a URL, and hdfs:// storage is not supported: "
            "nothing was read or written; pass a local or mounted folder, s3://bucket/prefix or "
            "gs://bucket/prefix",
        ),
        (
            ["--set", "train.init_from=s3://models/llama"],
            f"train.init_from: s3://models/llama {NOT_LOCAL}",
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


@pytest.mark.parametrize(
    ("run_dir", "message"),
    [
        (
            "hdfs://runs/a",
            "hdfs://runs/a is a URL, and hdfs:// storage is not supported: nothing was read or "
            "written; pass a local or mounted folder, s3://bucket/prefix or gs://bucket/prefix",
        ),
        (
            "s3://runs",
            "s3://runs names no folder in a bucket: nothing was read or written; pass "
            "s3://bucket/prefix",
        ),
    ],
)
def test_a_run_dir_on_unsupported_storage_is_refused_and_no_local_folder_appears(
    run_dir: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pathlib alone would make `hdfs://runs/a` the local folder `hdfs:/runs/a` and train there
    (s3:// and gs:// run dirs work: tests/test_object_storage.py)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as ended:
        trainer([*SMALL_RUN, "--run-dir", run_dir])
    assert ended.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"trainer: error: argument --run-dir: {message}"
    assert list(tmp_path.iterdir()) == []


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


def test_dry_run_prints_costs_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert trainer(["--preset", "small", "--dry-run", "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "preset small: 82,791,168 parameters" in out
    assert "MFLOPs per token" in out and "memory estimate" in out and "GiB" in out
    assert not (tmp_path / "run").exists()


def test_config_file_and_sets_are_resolved_printed_and_saved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("optimizer:\n  learning_rate: 2.0e-3\ntrain:\n  seed: 5\n")
    args = [*FAST, "--config", str(config), "--set", "train.seed=6", "--sample-tokens", "0"]
    assert trainer([*args, "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "learning_rate: 0.002" in saved and "seed: 6" in saved
    assert saved.strip() in out  # printed at start


NAN = ["--set", "optimizer.learning_rate=1e9", "--set", "optimizer.warmup_steps=0"]
NAN += ["--set", "train.max_nonfinite_in_row=2", "--max-steps", "30", "--checkpoint-every", "1"]


def test_nonfinite_steps_are_skipped_then_training_stops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert trainer([*FAST, *NAN, "--run-dir", str(tmp_path / "run")]) == 1
    out, err = capsys.readouterr()
    assert "SKIPPED (non-finite)" in out
    assert err.startswith("trainer: error: 2 non-finite steps in a row at step 3: stopping")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1"]


def test_rollback_reloads_the_last_good_checkpoint_at_most_three_times(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rollback = ["--set", "train.on_nonfinite=rollback"]
    assert trainer([*FAST, *NAN, *rollback, "--run-dir", str(tmp_path / "run")]) == 1
    out, err = capsys.readouterr()
    for n in (1, 2, 3):
        assert f"rolled back to step 1 (rollback {n} of 3), skipping those batches" in out
    assert "stopping" in err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise() -> None:
    from rtdlm.train import EvalLog, Progress, StepLog

    logs = [
        StepLog(step, 2.5, 1e-3, 1.0, 1234, 1.0, 0.0, 2.5e11, False, 0, mfu=0.25, peak_flops=1e12)
        for step in (50, 51)
    ]
    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        progress = Progress(stream, max_steps=100)
        for log in logs:
            progress.on_step(log)
        progress.on_eval(EvalLog(51, 2.0))
        progress.on_end(None)  # type: ignore[arg-type]
    bar = terminal.getvalue()
    assert "51/100" in bar and "loss 2.5000 | 1,234 tokens/s | MFU 25.0%" in bar and "\r" in bar
    assert "step    51 | held-out loss 2.0000 | perplexity 7.39\n" in bar
    lines = pipe.getvalue().splitlines()
    assert lines[0].startswith(
        "step    50 | loss 2.5000 | 1,234 tokens/s | MFU 25.0% | lr 1.00e-03"
    )
    assert (
        lines[2] == "step    51 | held-out loss 2.0000 | perplexity 7.39" and "\r" not in lines[0]
    )


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run dir and its bytes (the lock file names its last holder: left out)."""
    files = (p for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock")
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in files}


def test_resuming_onto_unusable_checkpoints_refuses_the_same_way_every_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every checkpoint corrupt: the run dir is refused in one line and left as it was, so a
    retry (a person, a script, a Job's restart) is refused alike instead of training from 0;
    --restart-if-all-corrupt sets them aside and trains from step 0."""
    run_dir = tmp_path / "run"
    run = ["--run-dir", str(run_dir), "--sample-tokens", "0"]
    assert trainer([*FAST, *run]) == 0
    for path in (run_dir / "checkpoints").rglob("*"):
        if path.is_file() and "/params/" in str(path):
            path.write_bytes(b"garbage")
    before = snapshot(run_dir)
    capsys.readouterr()
    errors = []
    for flags in ([], [], ["--no-resume"]):
        assert trainer([*FAST, *run, "--max-steps", "6", *flags]) == 2
        out, err = capsys.readouterr()
        assert err.startswith("trainer: error: ") and err.count("\n") == 1, err
        errors.append(err)
        assert snapshot(run_dir) == before  # config.yaml, steps.jsonl, checkpoints: as they were
    assert errors[0] == errors[1]
    assert errors[0].startswith(f"trainer: error: no intact checkpoint in {run_dir}/checkpoints: ")
    assert errors[0].endswith(
        "nothing was changed: put intact copies back, pass a new --run-dir, or rerun with "
        "--restart-if-all-corrupt to set them aside and train from step 0\n"
    )
    assert "already holds checkpoints and resuming is off (--no-resume)" in errors[2]

    assert trainer([*FAST, *run, "--max-steps", "6", "--restart-if-all-corrupt"]) == 0
    out = capsys.readouterr().out
    assert "training from step 0 (--restart-if-all-corrupt)" in out and "done: 6 steps (6 " in out
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept[0].startswith("3.corrupt-") and "6" in kept, kept
    assert [p.name.startswith("steps-before-") for p in run_dir.glob("steps*.jsonl")].count(True)


def test_a_corrupt_newest_checkpoint_is_one_line_naming_where_it_went(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run = ["--run-dir", str(run_dir), "--sample-tokens", "0", "--checkpoint-every", "2"]
    assert trainer([*FAST, *run, "--max-steps", "4"]) == 0
    files = [p for p in (run_dir / "checkpoints" / "4").rglob("*") if p.is_file()]
    victim = max((p for p in files if "/params/" in str(p)), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert trainer([*FAST, *run, "--max-steps", "6"]) == 0
    out, err = capsys.readouterr()
    [aside] = [p for p in (run_dir / "checkpoints").iterdir() if ".corrupt-" in p.name]
    lines = [line for line in out.splitlines() if " is corrupt" in line]
    assert lines == [
        f"checkpoint step 4 in {run_dir}/checkpoints is corrupt: "
        f"{victim.relative_to(run_dir / 'checkpoints' / '4')} does not match its XXH3-128 "
        f"digest; moved to {aside}; restored step 2 instead"
    ], out
    assert "WARNING" not in out + err and "resumed from step 2" in out
