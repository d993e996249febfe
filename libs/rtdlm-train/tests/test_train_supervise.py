"""The supervised child's end, as the parent tells it: real forks, real aborts. (That JAX's
own fatal report is what a lost peer produces is tests/test_multihost.py's.)"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from rtdlm.train.supervise import Job, supervise

# What JAX's coordination client writes to file descriptor 2 before it aborts a process
# whose peer stopped sending heartbeats (jaxlib 0.10.2, abridged).
LOST_PEER = (
    "E1207 15:54:23.021 3910 coordination_service_agent.cc:289] Polled an error from "
    "coordination service (this can be an error from this or another task).\n"
    "F1207 15:54:23.021 3910 client.h:80] Terminating process because the JAX distributed "
    "service detected fatal errors. absl::Status: UNAVAILABLE: The following tasks are "
    "unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed.\n"
)


def job(run_dir: Path | None = None) -> Job:
    return Job(2, 15, run_dir, "tool: error:")


def test_a_clean_end_keeps_its_status_and_leaves_no_log(tmp_path: Path) -> None:
    log = tmp_path / "jax.log"
    assert supervise(lambda: 0, job(), log) == (0, "")
    assert not log.exists()


def test_the_childs_error_lines_reach_stderr_when_the_parent_has_nothing_to_add(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    def work() -> int:
        print("tool: error: bad input", file=sys.stderr)
        return 2

    assert supervise(work, job(), tmp_path / "jax.log") == (2, "")
    assert capfd.readouterr().err == "tool: error: bad input\n"


def test_jax_aborting_on_a_lost_peer_is_one_line_naming_the_last_checkpoint(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    for step in ("8", "40", "48.orbax-checkpoint-tmp-1"):  # the last: not committed
        (tmp_path / "run" / "checkpoints" / step).mkdir(parents=True)

    def work() -> int:
        print("tool: error: checkpoint step 48 could not be saved", file=sys.stderr)
        os.write(2, LOST_PEER.encode())
        os.abort()

    log = tmp_path / "jax.log"
    code, line = supervise(work, job(tmp_path / "run"), log)
    assert (code, line) == (
        1,
        "lost process 1 of 2 (no heartbeat for 15 s); the last checkpoint is step 40; restart "
        f"the job to resume (JAX's log: {log})",
    )
    assert capfd.readouterr().err == ""  # the child's own error line went to the log
    assert "Terminating process" in log.read_text()
    assert "step 48 could not be saved" in log.read_text()


def test_a_crash_is_one_line_and_its_traceback_is_in_the_log(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    def work() -> int:
        raise RuntimeError("boom")

    log = tmp_path / "jax.log"
    code, line = supervise(work, job(tmp_path / "run"), log)
    assert code == 1
    assert line == (
        "the run failed: RuntimeError: boom; no checkpoint was written yet; restart the job to "
        f"resume (JAX's log: {log})"
    )
    assert "Traceback (most recent call last)" in log.read_text()
    assert capfd.readouterr().err == ""
