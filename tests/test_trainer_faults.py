"""Faults at a run's edges, tried as a new user would: a full disk during a checkpoint save, two
trainers on one run directory, a run directory that is a file or read-only."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SMALL_RUN, missing_tool, start_trainer

from rtdlm_trainer.main import main as trainer

pytestmark = pytest.mark.slow
# Mounts need root: CI here is root; GitHub's runners get it from passwordless sudo.
AS_ROOT = [] if os.geteuid() == 0 else ["sudo", "-n"]
REQUIRED = "RTDLM_REQUIRE_MOUNTS"  # set by CI, which runs as root: a mount that fails fails

FAST = [*SMALL_RUN, "--metrics-port", "0"]


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_a_second_trainer_on_a_run_dir_in_use_exits_2_naming_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    first = start_trainer(*FAST, "--max-steps", "100000", "--run-dir", str(run_dir))
    try:
        deadline = time.monotonic() + 300
        while str(first.pid) not in read(run_dir / ".lock"):  # it holds the lock, and says so
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        assert trainer([*FAST, "--max-steps", "3", "--run-dir", str(run_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"trainer: error: run dir {run_dir} is in use by pid {first.pid} on ")
        assert " since " in err and err.endswith("or pass another --run-dir")
        assert "\n" not in err
        assert not (run_dir / "checkpoints" / "3").exists()
    finally:
        first.kill()
        first.wait()
    # a killed holder frees the lock: the same command now resumes there
    assert trainer([*FAST, "--max-steps", "3", "--run-dir", str(run_dir)]) == 0


def test_a_run_dir_that_is_a_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    assert trainer([*FAST, "--max-steps", "2", "--run-dir", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"trainer: error: run dir {path} is a file: pass a directory path"
    )
    assert path.read_text() == "keep me"


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` bind-mounted read-only over itself (mount -o remount,ro, without the disk)."""
    done = subprocess.run([*AS_ROOT, "mount", "--bind", str(path), str(path)], capture_output=True)
    if done.returncode != 0:
        missing_tool(f"needs root to bind-mount: {done.stderr.decode().strip()}", REQUIRED)
    try:
        subprocess.run([*AS_ROOT, "mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield
    finally:
        subprocess.run([*AS_ROOT, "umount", str(path)], check=False)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (
            "",
            "cannot write to run dir {run_dir}: Read-only file system: make it writable (is it "
            "mounted read-only?) or pass another --run-dir",
        ),
        (
            "checkpoints",
            "cannot write checkpoints to {run_dir}/checkpoints: Read-only file system: make it "
            "writable (is it mounted read-only?) or save them elsewhere",
        ),
    ],
)
def test_a_read_only_run_dir_is_one_line_before_any_step(
    tmp_path: Path, where: str, message: str
) -> None:
    run_dir = tmp_path / "run"
    command = [*FAST, "--no-metrics", "--run-dir", str(run_dir)]
    assert trainer([*command, "--max-steps", "2"]) == 0

    def files() -> dict[Path, bytes]:  # but the lock file, which names its last holder
        return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    with read_only(run_dir / where):
        process = start_trainer(*command, "--max-steps", "4")
        out, err = process.communicate(timeout=600)
    assert process.returncode == 2, out + err
    assert err == f"trainer: error: {message.format(run_dir=run_dir)}\n"
    assert "step     3" not in out  # refused before training, not at the first save
    assert files() == before


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs we can resize: a real 'No space left on device' without filling this disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        [*AS_ROOT, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
    )
    if done.returncode != 0:
        missing_tool(f"needs root to mount a tmpfs: {done.stderr.decode().strip()}", REQUIRED)
    try:
        yield mount
    finally:
        subprocess.run([*AS_ROOT, "umount", str(mount)], check=False)


def resize(mount: Path, size: int) -> None:
    subprocess.run([*AS_ROOT, "mount", "-o", f"remount,size={size}", str(mount)], check=True)


def checkpoint_bytes(tmp_path: Path) -> int:
    """What one checkpoint of the FAST model takes on disk (the size limit is set from it)."""
    run_dir = tmp_path / "measure"
    assert trainer([*FAST, "--max-steps", "1", "--no-metrics", "--run-dir", str(run_dir)]) == 0
    files = (run_dir / "checkpoints" / "1").rglob("*")
    return sum(p.stat().st_size for p in files if p.is_file())


def test_a_full_disk_during_a_save_is_one_line_and_a_rerun_resumes(
    tmp_path: Path, small_disk: Path
) -> None:
    """The checkpoint filesystem holds one checkpoint and a half: step 2 is saved, step 4 is
    not. The trainer says so in one line on stderr, removes the partial save, exits 1; with
    room again the same command resumes from step 2 and finishes."""
    size = checkpoint_bytes(tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    command = [*FAST, "--max-steps", "6", "--checkpoint-every", "2", "--run-dir", str(run_dir)]
    subprocess.run(
        [*AS_ROOT, "mount", "--bind", str(small_disk), str(run_dir / "checkpoints")], check=True
    )
    try:
        resize(small_disk, int(size * 1.5))
        process = start_trainer(*command)
        out, err = process.communicate(timeout=600)
        assert process.returncode == 1, out + err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err  # no tracebacks from orbax's threads
        [line] = lines
        assert line.startswith(
            f"trainer: error: checkpoint step 4 could not be saved to {run_dir}/checkpoints/4: "
            "No space left on device ("
        ), line
        assert " free); the partial save was removed; the last good checkpoint is step 2" in line
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2"]

        resize(small_disk, size * 8)
        again = start_trainer(*command)
        out, err = again.communicate(timeout=600)
        assert again.returncode == 0, out + err
        assert "resumed from step 2" in out and "done: 6 steps (4 this run" in out
    finally:
        subprocess.run([*AS_ROOT, "umount", str(run_dir / "checkpoints")], check=False)
    shutil.rmtree(run_dir, ignore_errors=True)
