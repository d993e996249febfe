"""The trainer as a process: killed with SIGKILL or stopped with SIGTERM mid-run, then resumed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import INTERRUPTED, SMALL_RUN, start_trainer

from rtdlm.ckpt import restore_params
from rtdlm.data import stdlib_documents
from rtdlm_trainer.main import main as trainer
from rtdlm_trainer.prepare_data import main as prepare_data

pytestmark = pytest.mark.slow

SMALL = [*SMALL_RUN, "--max-steps", "20", "--checkpoint-every", "5", "--eval-every", "10"]
SMALL += ["--metrics-port", "0"]


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return start_trainer(*SMALL, "--run-dir", str(run_dir), *extra, stderr=subprocess.STDOUT)


def run_until(process: subprocess.Popen, line_start: str) -> str:
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(line_start):
            return "".join(seen)
    process.wait()
    pytest.fail(f"never printed {line_start!r}:\n{''.join(seen)}")


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step run again after a resume overwrites the killed run's entry."""
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


def final_params(run_dir: Path) -> list[np.ndarray]:
    checkpoint = restore_params(run_dir / "checkpoints")
    assert checkpoint.step == 20
    return [np.asarray(x) for x in jax.tree.leaves(checkpoint.params)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert trainer([*SMALL, "--run-dir", str(run_dir)]) == 0
    return run_dir


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A parquet corpus as shards under a BPE that prepare-data trained on it: the flags that
    train on them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("bpe")
    texts = [text for _, text in stdlib_documents()]
    pq.write_table(pa.table({"text": texts}), root / "corpus.parquet")
    shards = root / "shards"
    bpe = ["--train-tokenizer", "bpe", "--vocab-size", "300"]
    assert prepare_data([str(root / "corpus.parquet"), "--output", str(shards), *bpe]) == 0
    return ["--set", f"data.path={shards}"]


@pytest.fixture(scope="module")
def uninterrupted_on_bpe(tmp_path_factory: pytest.TempPathFactory, bpe_data: list[str]) -> Path:
    run_dir = tmp_path_factory.mktemp("straight-bpe") / "run"
    assert trainer([*SMALL, *bpe_data, "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run(
    tmp_path: Path, uninterrupted: Path
) -> None:
    run_dir = tmp_path / "run"
    process = start(run_dir, *INTERRUPTED)
    run_until(process, "step    13 |")  # checkpoint 5 is committed, 10 may still be in flight
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    resumed = start(run_dir)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert re.search(r"resumed from step (5|10|15) ", output), output
    assert losses(run_dir) == losses(uninterrupted)  # exact floats, every step
    for a, b in zip(final_params(run_dir), final_params(uninterrupted), strict=True):
        assert a.tobytes() == b.tobytes()
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or run_dir / "xla-cache"  # the run dir's
    assert any(Path(cache).iterdir())  # unless JAX's variable names one: the resumed run reuses it


def test_sigterm_on_a_trained_bpe_checkpoints_exits_143_and_resumes_bit_for_bit(
    tmp_path: Path, bpe_data: list[str], uninterrupted_on_bpe: Path
) -> None:
    """On shards under a tokenizer trained by prepare-data, which the run keeps with it."""
    run_dir = tmp_path / "run"
    process = start(run_dir, *bpe_data, *INTERRUPTED)
    run_until(process, "step     7 |")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, output  # unfinished: a Job restarts it
    stopped = [line for line in output.splitlines() if line.startswith("stopped by SIGTERM")]
    assert stopped, output
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert 7 <= step < 20 and (run_dir / "checkpoints" / str(step)).is_dir()
    resumed = start(run_dir, *bpe_data)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and f"resumed from step {step}" in output, output
    assert losses(run_dir) == losses(uninterrupted_on_bpe)
    for a, b in zip(final_params(run_dir), final_params(uninterrupted_on_bpe), strict=True):
        assert a.tobytes() == b.tobytes()


def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    # steps of tenths of a second, so the second signal lands while the first is being honoured
    slow = ["--max-steps", "400", "--seq-len", "128", "--batch-size", "192"]
    process = start(tmp_path / "run", *slow, "--set", "model.num_layers=2")
    run_until(process, "step     2 |")
    process.send_signal(signal.SIGINT)
    run_until(process, "SIGINT: finishing this step")
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, output
    assert "SIGINT again: exiting now" in output
