"""A checkpoint save that fails on a full disk: counted, reported once, and then either the end
of the run (train.on_checkpoint_error=stop) or retried at the next cadence (continue)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from small_run import small_config

from rtdlm import ckpt
from rtdlm.data import split_documents as split
from rtdlm.data.corpus import stdlib_documents
from rtdlm.metrics import PrometheusTrainingCallback
from rtdlm.train import Callback, CheckpointLog, Prometheus, RunResult, Trainer

# Mounts need root: CI here is root; GitHub's runners get it from passwordless sudo.
AS_ROOT = [] if os.geteuid() == 0 else ["sudo", "-n"]
RUN = ["data.batch_size=2", "train.max_steps=8", "train.checkpoint_every=2", "train.eval_every=4"]
RUN += ["model.d_model=64"]  # checkpoints large enough that a tmpfs sized in them fills on time
DATA = split(stdlib_documents())


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A resizable tmpfs as the run's checkpoint directory: a real ENOSPC, this disk spared."""
    run_dir = tmp_path / "run"
    mount = run_dir / "checkpoints"
    mount.mkdir(parents=True)
    done = subprocess.run(
        [*AS_ROOT, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
    )
    if done.returncode != 0:  # a failure where CI (root) sets RTDLM_REQUIRE_MOUNTS
        (pytest.fail if os.environ.get("RTDLM_REQUIRE_MOUNTS") else pytest.skip)(
            f"needs root to mount a tmpfs: {done.stderr.decode().strip()}"
        )
    try:
        yield run_dir
    finally:
        subprocess.run([*AS_ROOT, "umount", str(mount)], check=False)


def resize(run_dir: Path, size: int) -> None:
    subprocess.run(
        [*AS_ROOT, "mount", "-o", f"remount,size={size}", str(run_dir / "checkpoints")], check=True
    )


def one_checkpoint(tmp_path: Path) -> int:
    cfg = small_config(*RUN, "train.max_steps=1")
    Trainer(cfg, DATA, tmp_path / "measure", compile_cache=False).run()
    files = (tmp_path / "measure" / "checkpoints" / "1").rglob("*")
    return sum(p.stat().st_size for p in files if p.is_file())


class Failures(Callback):
    def __init__(self, on_failure: object = None) -> None:
        self.failed: list[CheckpointLog] = []
        self.committed: list[int] = []
        self.on_failure = on_failure

    def on_checkpoint_failed(self, log: CheckpointLog) -> None:
        self.failed.append(log)
        if callable(self.on_failure):
            self.on_failure()

    def on_checkpoint_committed(self, log: CheckpointLog) -> None:
        self.committed.append(log.step)


def train(run_dir: Path, *sets: str, callback: Callback) -> tuple[RunResult, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = Prometheus(PrometheusTrainingCallback(registry, run="disk"))
    cfg = small_config(*RUN, *sets)
    trainer = Trainer(cfg, DATA, run_dir, [metrics, callback], compile_cache=False)
    return trainer.run(), registry


def errors(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value(
        "rtdlm_checkpoint_errors_total", {"run": "disk", "process_index": "0"}
    )


def test_stop_ends_the_run_with_one_line_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, disk: Path
) -> None:
    resize(disk, int(one_checkpoint(tmp_path) * 1.5))  # room for step 2, not for step 4 too
    failures = Failures()
    result, registry = train(disk, callback=failures)
    assert result.status == "checkpoint_error" and not result.ok
    assert result.message.startswith(f"checkpoint step 4 could not be saved to {disk}/checkpoints")
    assert "No space left on device" in result.message and "\n" not in result.message
    assert "the last good checkpoint is step 2" in result.message
    assert [f.step for f in failures.failed] == [4] and failures.committed == [2]
    assert errors(registry) == 1
    assert result.last_checkpoint == 2
    assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["2"]
    ckpt.CheckpointManager(disk / "checkpoints", read_only=True).restore(2)  # intact, verified


def test_continue_trains_on_and_saves_at_the_next_cadence_once_there_is_room(
    tmp_path: Path, disk: Path
) -> None:
    size = one_checkpoint(tmp_path)
    resize(disk, int(size * 1.5))
    failures = Failures(on_failure=lambda: resize(disk, size * 10))  # an operator frees space
    result, registry = train(disk, "train.on_checkpoint_error=continue", callback=failures)
    assert result.status == "completed" and result.step == 8
    assert [f.step for f in failures.failed] == [4] and failures.committed == [2, 6, 8]
    assert errors(registry) == 1
    assert sorted(int(p.name) for p in (disk / "checkpoints").iterdir()) == [2, 6, 8]
