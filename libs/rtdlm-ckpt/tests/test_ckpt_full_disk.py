"""A save that runs out of disk: one clear error, the partial save gone, the manager usable.

The disk is really full: a small tmpfs (we run as root, Pants sandboxes too), or for the
subprocess test without root, RLIMIT_FSIZE with SIGXFSZ ignored so writes fail with EFBIG.
"""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import ckpt_worker
import numpy as np
import pytest
from ckpt_worker import DOES_NOT_FIT, FITS, disk_params, fill, poll_until_failed
from etils import epath

from rtdlm.ckpt import (
    CheckpointError,
    CheckpointManager,
    CheckpointSaveError,
    Retention,
    integrity,
    quiet,
)
from rtdlm.ckpt.manager import _os_error

TMPFS_SIZE = "16m"


def tool(name: str) -> str:
    """Pants runs tests without PATH: look in the usual places too."""
    usual = (f"{directory}/{name}" for directory in ("/usr/bin", "/bin", "/usr/sbin", "/sbin"))
    return shutil.which(name) or next((path for path in usual if os.path.exists(path)), name)


# Mounts need root: CI here is root; GitHub's runners get it from passwordless sudo.
AS_ROOT = [] if os.geteuid() == 0 else [tool("sudo"), "-n"]


def mount_tmpfs(mountpoint: Path) -> bool:
    mountpoint.mkdir(parents=True, exist_ok=True)
    command = [
        *AS_ROOT,
        tool("mount"),
        "-t",
        "tmpfs",
        "-o",
        f"size={TMPFS_SIZE}",
        "tmpfs",
        str(mountpoint),
    ]
    try:
        result = subprocess.run(command, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def unmount(mountpoint: Path) -> None:
    if (
        subprocess.run([*AS_ROOT, tool("umount"), str(mountpoint)], capture_output=True).returncode
        != 0
    ):
        subprocess.run([*AS_ROOT, tool("umount"), "-l", str(mountpoint)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB filesystem of its own, so filling it fills nothing else."""
    mountpoint = tmp_path / "disk"
    if not mount_tmpfs(mountpoint):
        # CI runs as root and sets RTDLM_REQUIRE_MOUNTS: there a mount that fails is a failure
        (pytest.fail if os.environ.get("RTDLM_REQUIRE_MOUNTS") else pytest.skip)(
            "needs root (or CAP_SYS_ADMIN) to mount a tmpfs; "
            "test_a_full_disk_prints_one_line_from_the_whole_process covers it with RLIMIT_FSIZE"
        )
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.isdigit())


def assert_params(ckpt_params: dict, step: int, shape: tuple[int, int]) -> None:
    np.testing.assert_array_equal(np.asarray(ckpt_params["w"]), disk_params(step, shape)["w"])


def test_a_full_disk_is_one_clear_line_and_training_goes_on(
    small_disk: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.WARNING)
    directory = small_disk / "checkpoints"
    with CheckpointManager(directory, Retention(keep_last=1)) as manager:
        manager.save(10, params=disk_params(10, FITS), metrics={"eval_loss": 2.0})
        manager.wait()
        filler = fill(small_disk, leave=2 * 2**20)
        manager.save(20, params=disk_params(20, DOES_NOT_FIT), metrics={"eval_loss": 1.0})
        error = poll_until_failed(manager, 20)  # committed(), polled as the trainer does

        message = str(error)
        assert "\n" not in message
        assert message.startswith(f"checkpoint step 20 could not be saved to {directory}/20: ")
        assert "No space left on device (" in message and " free); " in message
        assert "the partial save was removed" in message
        assert f"the last good checkpoint is step 10 in {directory}: free space" in message
        assert error.step == 20 and str(error.path) == str(directory / "20")
        assert error.last_good == 10 and error.errno == errno.ENOSPC
        assert isinstance(error.free_bytes, int) and 0 <= error.free_bytes < 2 * 2**20
        assert isinstance(error, CheckpointError)

        assert leftovers(directory) == []  # no <step>.orbax-checkpoint-tmp holding space
        assert manager.committed() == 10  # reported once; then back to normal
        manager.wait()
        assert manager.steps() == [10] and manager.latest_step() == 10
        assert_params(manager.restore(10).params, 10, FITS)  # verified against its manifest
        integrity.verify(epath.Path(directory / "10"))

        filler.unlink()
        manager.save(30, params=disk_params(30, DOES_NOT_FIT), metrics={"eval_loss": 3.0})
        manager.wait()
        assert manager.committed() == 30
        assert manager.steps() == [30]  # keep_last=1: retention deleted step 10
        assert_params(manager.restore().params, 30, DOES_NOT_FIT)
    assert leftovers(directory) == []

    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Traceback" not in caplog.text
    assert len(err.splitlines()) <= 2, err
    assert len(caplog.records) <= 1, caplog.text


@pytest.mark.parametrize("surface", ["wait", "save", "close", "exit"])
def test_a_failed_save_is_reported_once_wherever_it_surfaces(
    small_disk: Path, surface: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    directory = small_disk / "checkpoints"
    manager = CheckpointManager(directory)
    manager.save(10, params=disk_params(10, FITS))
    filler = fill(small_disk, leave=2 * 2**20)
    manager.save(20, params=disk_params(20, DOES_NOT_FIT))
    if surface == "wait":
        with pytest.raises(CheckpointSaveError, match="step 20 .* last good checkpoint is step 10"):
            manager.wait()
        manager.wait()
        assert manager.committed() == 10
    elif surface == "save":
        with pytest.raises(CheckpointSaveError, match="checkpoint step 20 could not") as caught:
            manager.save(30, params=disk_params(30, FITS))  # not started: the caller retries
        assert caught.value.step == 20 and manager.steps() == [10]
        filler.unlink()
        manager.save(30, params=disk_params(30, FITS))
        manager.wait()
        assert manager.steps() == [10, 30]
    elif surface == "close":
        with pytest.raises(CheckpointSaveError, match="checkpoint step 20"):
            manager.close()
    else:
        with pytest.raises(RuntimeError, match="the training step"), manager:
            raise RuntimeError("the training step failed")  # not masked by the save
        assert "checkpoint step 20 could not be saved" in caplog.text
    if surface in ("wait", "save"):
        manager.close()  # nothing left to report
    assert leftovers(directory) == []
    assert len(caplog.records) <= 1 and "Traceback" not in caplog.text
    with CheckpointManager(directory) as reopened:
        assert 10 in reopened.steps() and 20 not in reopened.steps()
        assert_params(reopened.restore(10).params, 10, FITS)


def test_a_full_disk_prints_one_line_from_the_whole_process(tmp_path: Path) -> None:
    """orbax's threads print nothing: the process's stderr is empty but for our line."""
    mountpoint = tmp_path / "disk"
    limit: list[str] = []
    if not mount_tmpfs(mountpoint):
        limit = ["--fsize-limit", str(3 * 2**20)]  # no root: files past 3 MiB fail, EFBIG
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1",
    }
    try:
        process = subprocess.run(
            [sys.executable, ckpt_worker.__file__, "full-disk", "--dir", str(mountpoint), *limit],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        if not limit:
            unmount(mountpoint)
    assert process.returncode == 0, process.stdout + process.stderr
    assert "Traceback" not in process.stderr
    assert len(process.stderr.splitlines()) < 5, process.stderr
    lines = process.stdout.splitlines()
    error_lines = [line for line in lines if line.startswith("trainer: checkpoint error:")]
    assert len(error_lines) == 1, process.stdout
    assert "checkpoint step 20 could not be saved" in error_lines[0]
    assert (
        " free); the partial save was removed; the last good checkpoint is step 10"
        in (error_lines[0])
    )
    report = json.loads(lines[-1])
    assert report["error"]["step"] == 20 and report["error"]["last_good"] == 10
    assert report["error"]["errno"] == (errno.EFBIG if limit else errno.ENOSPC)
    assert report["left_after_failure"] == ["10"]  # no temporary directory left
    assert report["restored"] == 10
    assert report["steps"] == [30]  # saving works again, and retention (keep_last=1) runs


def test_an_error_after_the_commit_loses_nothing_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=disk_params(1, FITS))
        manager.wait()

        def after_commit(step: int) -> None:
            raise RuntimeError("monitoring backend unavailable")

        manager._manager._finalize_checkpoint = after_commit  # runs after the commit rename
        manager.save(2, params=disk_params(2, FITS))
        manager.wait()  # no error: step 2 is complete and sealed
        assert manager.committed() == 2 and manager.steps() == [1, 2]
        assert_params(manager.restore().params, 2, FITS)
    assert "checkpoint step 2 is committed, but orbax reported" in caplog.text
    assert len(caplog.records) == 1 and "Traceback" not in caplog.text


def test_the_reason_is_the_os_error_not_tensorstores_page() -> None:
    tensorstore = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local file "/x/": '
        "Failed to write 4644864 bytes to file 4: No space left on device "
        "[os_error_code='28'] [source locations='tensorstore/kvstore/file/file_key_value_store.cc']"
    )
    assert _os_error(tensorstore) == ("No space left on device", errno.ENOSPC)
    wrapped = RuntimeError("commit failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert _os_error(wrapped) == ("Disk quota exceeded", errno.EDQUOT)
    assert _os_error(TimeoutError("barrier\n  timed out")) == ("barrier timed out", None)
    error = CheckpointSaveError(3, epath.Path("/r/c/3"), "boom")
    assert str(error) == (
        "checkpoint step 3 could not be saved to /r/c/3: boom; the partial save was removed; "
        "there is no earlier checkpoint in /r/c"
    )
    error = CheckpointSaveError(
        3, epath.Path("/r/c/3"), "No space left on device", errno=errno.ENOSPC, free_bytes=1_234_567
    )
    assert "(1.2 MB free)" in str(error) and str(error).endswith("lower train.keep_checkpoints")


def test_the_log_filter_drops_only_orbax_records_about_rtdlm_saves(tmp_path: Path) -> None:
    orbax_file = os.path.join(quiet._ORBAX_SOURCE, "checkpoint_manager.py")

    def record(
        message: str,
        pathname: str = orbax_file,
        level: int = logging.ERROR,
        error: BaseException | None = None,
    ) -> bool:
        exc_info = (type(error), error, None) if error is not None else None
        made = logging.LogRecord("absl", level, pathname, 1, message, None, exc_info)
        return quiet.claims.filter(made)

    # what orbax's writer threads log when a write fails on a full disk: no path anywhere
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    denied = OSError(errno.EACCES, "Permission denied")

    ours = str(tmp_path / "ckpts" / "2")
    assert record(f"Failed to run 3 commit ops, directory: {ours}")  # nothing claimed yet
    quiet.claims.start(ours)
    try:
        assert not record("_SignalingThread.run() raised an exception", error=disk_full)
        assert record("_SignalingThread.run() raised an exception", error=denied)
        assert not record(f"Failed to run 3 commit ops, directory: {ours}")
        assert not record(f"writing {ours}.orbax-checkpoint-tmp/params failed")
        assert record(f"Failed to remove checkpoint ({ours}0)")  # step 20 is not step 2
        assert record(f"directory: {ours}", pathname="/elsewhere/app.py")  # not orbax's
        assert record(f"directory: {ours}", level=logging.WARNING)  # only errors
        assert record("Failed to remove checkpoint (/other/run/2)")
    finally:
        quiet.claims.finish(ours, failed=False)
    assert record(f"Failed to run 3 commit ops, directory: {ours}")
