"""Multi-host training through the real trainer CLI: two processes on 127.0.0.1 joined by
jax.distributed, gradients all-reduced over gloo. No simulated communication."""

from __future__ import annotations

import json
import re
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


LAST = 24
STEPS = ["--max-steps", str(LAST), "--checkpoint-every", "8", "--heartbeat-timeout", "5"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An uninterrupted two-process run, and what each process printed."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    return run_dir, finish(pair(run_dir, *STEPS))


def test_two_processes_train_the_same_curve_as_one(
    tmp_path: Path, straight: tuple[Path, list[str]]
) -> None:
    """The same global batch of 4, as 2 rows on each of 2 processes or 4 rows on one."""
    two_dir, (out0, out1) = straight
    finish([start(tmp_path / "one", *STEPS)])
    two, one = losses(two_dir), losses(tmp_path / "one")
    assert list(two) == list(range(1, LAST + 1))
    assert list(two.values()) == pytest.approx(list(one.values()), rel=1e-5)
    assert "[process 0/2] resumed" not in out0 and f"done: {LAST} steps" in out0 + out1
    assert sorted(int(p.name) for p in (two_dir / "checkpoints").iterdir()) == [8, 16, 24]


def kill_one_at(run_dir: Path, step: int, victim_id: int) -> str:
    """A pair that trains in `run_dir` until `step`, then process `victim_id` is SIGKILLed: the
    other one's stderr, once it has exited non-zero within the heartbeat timeout."""
    processes = pair(run_dir, *STEPS)
    victim, survivor = processes[victim_id], processes[1 - victim_id]
    deadline = time.monotonic() + 300
    while len(losses(run_dir) if (run_dir / "steps.jsonl").exists() else {}) < step:
        assert survivor.poll() is None and time.monotonic() < deadline, survivor.communicate()
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = survivor.communicate(timeout=60)
    assert survivor.returncode == 1  # so Kubernetes restarts the job
    assert time.monotonic() - killed_at < 5 + 15  # the heartbeat timeout, and some slack
    victim.wait()
    return err


def test_a_lost_peer_is_one_line_on_the_other_and_a_rerun_resumes_to_the_same_loss(
    tmp_path: Path, straight: tuple[Path, list[str]]
) -> None:
    """A worker killed, then the coordinator: each time the other process says so in one line
    (JAX's own report goes to the log it names), and the job, started again, resumes."""
    run_dir = tmp_path / "run"
    worker_lost = kill_one_at(run_dir, LAST // 3, victim_id=1)
    coordinator_lost = kill_one_at(run_dir, 2 * LAST // 3, victim_id=0)
    checkpoint = r"(the last checkpoint is step \d+|no checkpoint was written yet)"
    for err, lost in (
        (worker_lost, r"lost process 1 of 2 \(no heartbeat for 5 s\)"),
        (coordinator_lost, r"lost process 0 of 2, the coordinator \(it stopped answering\)"),
    ):
        resume = rf"{checkpoint}; restart the job to resume \(JAX's log: (.+)\)"
        said = re.fullmatch(f"trainer: error: {lost}; {resume}", err.strip())
        assert said, err
        jax_said = Path(said.group(2)).read_text()
        assert "Terminating process because the JAX distributed service" in jax_said

    out0, _ = finish(pair(run_dir, *STEPS))
    assert "resumed from step" in out0
    resumed, uninterrupted = losses(run_dir), losses(straight[0])
    assert resumed[LAST] == pytest.approx(uninterrupted[LAST], rel=1e-6)


def test_a_coordinator_that_cannot_be_reached_is_one_line_within_the_timeout(
    tmp_path: Path,
) -> None:
    port = free_port()
    began = time.monotonic()
    alone = start(tmp_path / "run", "--join-timeout", "2", process=1, port=port)
    out, err = alone.communicate(timeout=120)
    assert alone.returncode == 2, out + err
    assert time.monotonic() - began < 60
    lines = [line for line in err.splitlines() if line.startswith("trainer: error:")]
    assert (
        len(lines) == 1 and f"could not join the job at 127.0.0.1:{port} as process 1" in lines[0]
    )
    assert "within 2s" in lines[0]
    assert not (tmp_path / "run").exists()
