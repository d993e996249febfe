"""Multi-host training through the real trainer CLI: two processes on 127.0.0.1 joined by
jax.distributed, gradients all-reduced over gloo. No simulated communication."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import SMALL_RUN, free_port, start_trainer

import rtdlm_trainer.main  # noqa: F401 # what the subprocesses run: Pants puts it in the sandbox

pytestmark = pytest.mark.slow

RUN = [*SMALL_RUN, "--batch-size", "4", "--no-metrics", "--eval-every", "1000"]
RUN += ["--set", "model.compute_dtype=float32"]  # curves compared at float32 tolerances


def start(run_dir: Path, *args: str, process: int | None = None, port: int = 0) -> subprocess.Popen:
    hosts = []
    if process is not None:
        hosts = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
        hosts += ["--process-id", str(process)]
    return start_trainer(*RUN, "--run-dir", str(run_dir), *args, *hosts)


def pair(run_dir: Path, *args: str) -> list[subprocess.Popen]:
    port = free_port()
    return [start(run_dir, *args, process=i, port=port) for i in (0, 1)]


def finish(processes: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, out[-2000:] + err[-3000:]
        outputs.append(out)
    return outputs


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


def test_two_processes_train_the_same_curve_as_one(tmp_path: Path) -> None:
    """The same global batch of 4, as 2 rows on each of 2 processes or 4 rows on one."""
    steps = ["--max-steps", "6", "--checkpoint-every", "3"]
    out0, out1 = finish(pair(tmp_path / "two", *steps))
    finish([start(tmp_path / "one", *steps)])
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert list(two) == [1, 2, 3, 4, 5, 6]
    assert list(two.values()) == pytest.approx(list(one.values()), rel=1e-5)
    assert "[process 0/2] resumed" not in out0 and "done: 6 steps" in out0 + out1
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["3", "6"]


def test_a_lost_peer_ends_the_other_and_a_rerun_resumes_to_the_same_loss(tmp_path: Path) -> None:
    last = 60
    steps = ["--max-steps", str(last), "--checkpoint-every", "20", "--heartbeat-timeout", "5"]
    straight = tmp_path / "straight"
    finish(pair(straight, *steps))

    run_dir = tmp_path / "run"
    survivor, victim = pair(run_dir, *steps)
    deadline = time.monotonic() + 300
    while len(losses(run_dir) if (run_dir / "steps.jsonl").exists() else {}) < 30:
        assert survivor.poll() is None and time.monotonic() < deadline, survivor.communicate()
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    survivor.communicate(timeout=60)
    assert survivor.returncode != 0  # so Kubernetes restarts the job
    assert time.monotonic() - killed_at < 5 + 15  # the heartbeat timeout, and some slack
    victim.wait()

    out0, _ = finish(pair(run_dir, *steps))
    assert "resumed from step" in out0
    resumed, uninterrupted = losses(run_dir), losses(straight)
    assert resumed[last] == pytest.approx(uninterrupted[last], rel=1e-6)


def test_a_coordinator_that_cannot_be_reached_is_one_line_within_the_timeout(
    tmp_path: Path,
) -> None:
    port = free_port()
    began = time.monotonic()
    alone = start(tmp_path / "run", "--join-timeout", "5", process=1, port=port)
    out, err = alone.communicate(timeout=120)
    assert alone.returncode == 2, out + err
    assert time.monotonic() - began < 60
    lines = [line for line in err.splitlines() if line.startswith("trainer: error:")]
    assert (
        len(lines) == 1 and f"could not join the job at 127.0.0.1:{port} as process 1" in lines[0]
    )
    assert "within 5s" in lines[0]
    assert not (tmp_path / "run").exists()
