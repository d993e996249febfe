"""Real processes: SIGKILL mid-run and mid-save, and JAX started with 8, 1 and 4 devices."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ckpt_worker
import jax
import numpy as np
import pytest

from rtdlm.ckpt import CheckpointManager, CorruptCheckpointError, restore_params

pytestmark = pytest.mark.slow


def worker(*args: str, devices: int = 1) -> subprocess.Popen:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": flags,  # with the test run's own (pants.toml)
    }
    return subprocess.Popen(
        [sys.executable, ckpt_worker.__file__, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def run_ok(*args: str, devices: int = 1) -> str:
    code, output = finish(worker(*args, devices=devices))
    assert code == 0, output
    return output


def final_state(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as saved:
        return {name: saved[name] for name in saved.files}


def test_killed_and_resumed_training_ends_bit_identical(tmp_path: Path) -> None:
    run_ok(
        "train",
        "--dir",
        str(tmp_path / "straight"),
        "--steps",
        "12",
        "--out",
        str(tmp_path / "a.npz"),
    )
    code, output = finish(
        worker("train", "--dir", str(tmp_path / "killed"), "--steps", "12", "--die-after", "5")
    )
    assert code == -signal.SIGKILL, output
    resumed = run_ok(
        "train",
        "--dir",
        str(tmp_path / "killed"),
        "--steps",
        "12",
        "--out",
        str(tmp_path / "b.npz"),
    )
    assert "resumed at step 4" in resumed or "resumed at step 5" in resumed
    straight, killed = final_state(tmp_path / "a.npz"), final_state(tmp_path / "b.npz")
    assert straight.keys() == killed.keys() and len(straight) > 5
    for name in straight:
        assert straight[name].dtype == killed[name].dtype
        assert straight[name].tobytes() == killed[name].tobytes(), name


def check_after_kill(directory: Path) -> int:
    """Every visible checkpoint is complete or detected; the newest complete one is restored."""
    with CheckpointManager(directory) as manager:  # also sweeps away the interrupted save
        ckpt = manager.restore_latest()
        visible = manager.steps()
    assert not [p for p in directory.iterdir() if "tmp" in p.name]
    expected = ckpt_worker.content(ckpt.step)
    for name, want in expected.items():
        np.testing.assert_array_equal(np.asarray(ckpt.params[name]), want)
    for step in visible:
        try:
            params = restore_params(directory, step).params
        except CorruptCheckpointError:  # e.g. an old step whose deletion was cut short
            assert step < ckpt.step
            continue
        np.testing.assert_array_equal(np.asarray(params["v"]), ckpt_worker.content(step)["v"])
    return ckpt.step


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.1, 0.2, 0.4, 0.7])
def test_kill_during_async_save_never_exposes_a_half_written_checkpoint(
    tmp_path: Path, delay: float
) -> None:
    process = worker("spin", "--dir", str(tmp_path))
    assert process.stdout is not None
    for line in process.stdout:
        if line.strip() == "ready":
            break
    else:
        pytest.fail(finish(process)[1])
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    code, output = finish(process)
    assert code == -signal.SIGKILL, output
    assert check_after_kill(tmp_path) >= 2


@pytest.mark.parametrize("moment", ["manifest", "after-manifest"])
def test_kill_inside_the_commit_window_leaves_the_previous_checkpoint(
    tmp_path: Path, moment: str
) -> None:
    code, output = finish(worker("spin", "--dir", str(tmp_path), "--die-in", moment))
    assert code == -signal.SIGKILL, output
    assert (tmp_path / "3.orbax-checkpoint-tmp").exists()  # written but never committed
    assert check_after_kill(tmp_path) == 2


def test_checkpoint_moves_between_device_layouts(tmp_path: Path) -> None:
    assert "saved on 8 devices" in run_ok("reshard", "save", "--dir", str(tmp_path), devices=8)
    assert len(jax.devices()) == 1
    one_device = restore_params(tmp_path)
    for got, want in zip(
        jax.tree.leaves(one_device.params), jax.tree.leaves(ckpt_worker.reshard_tree()), strict=True
    ):
        assert len(got.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(got), want)
    assert "restored onto 4 devices" in run_ok(
        "reshard", "restore", "--dir", str(tmp_path), devices=4
    )
