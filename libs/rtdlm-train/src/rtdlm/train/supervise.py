"""A multi-host process that loses a peer ends in one line, not in JAX's fatal log.

When a peer stops sending heartbeats (or the coordinator stops answering), JAX's coordination
client aborts the process from a C++ thread: no Python runs after it, and the terminal gets a
page of glog lines and a stack trace (exit 134). So the work runs in a forked child: the
child's C++ output (file descriptor 2) goes to a log file while Python's own stderr stays on
the terminal, and the parent, which holds no JAX state, turns the child's end into one line.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rtdlm import ckpt

_UNHEALTHY = re.compile(r"tasks are unhealthy \(stopped sending heartbeats\):\s*([\d\s,]+)")
_LEADER = "Failed to send RPC to coordination service"
_FATAL = re.compile(r"^F\d{4} [\d:.]+\s+\d+ \S+\] (.*)$", re.MULTILINE)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Job:
    """What the one line names: this job's size, its heartbeat timeout and its run dir."""

    num_processes: int | None  # None: as JAX's cluster detection found it
    heartbeat_seconds: int
    run_dir: Path | None
    error_prefix: str = "error:"  # the child's lines that the parent's line may replace


def supervise(work: Callable[[], int], job: Job, log_path: Path | None = None) -> tuple[int, str]:
    """Runs work() in a child process; returns its exit status and, where JAX ended it, the
    line that says why (else ""). SIGTERM and SIGINT are passed on to the child once. Call it
    before this process starts a JAX backend: the child forks, and exits as a process does
    (atexit handlers, JAX's shutdown of the job among them)."""
    log_path = log_path or Path(tempfile.gettempdir()) / f"rtdlm-trainer-{os.getpid()}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()  # the child's Python stderr, relayed here
    child = os.fork()
    if child == 0:  # pragma: no cover - the child ends in os._exit, where coverage cannot see
        os.close(read_end)
        _run_child(work, log_path, write_end)
    os.close(write_end)
    held: list[str] = []
    relay = threading.Thread(target=_relay, args=(read_end, job.error_prefix, held), daemon=True)
    relay.start()
    previous = {s: signal.signal(s, _forward(child)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        _, status = os.waitpid(child, 0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    relay.join(timeout=10)
    code = os.waitstatus_to_exitcode(status)
    code = 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says
    explained = explain(_read(log_path), job, code) if code else ""
    if explained:  # the child's own error lines (a save that failed, ...) follow from it
        with open(log_path, "a") as log:
            log.writelines(held)
        return 1, f"{explained} (JAX's log: {log_path})"
    sys.stderr.writelines(held)
    if code == 0:
        log_path.unlink(missing_ok=True)
    return code, ""


def _relay(read_end: int, error_prefix: str, held: list[str]) -> None:
    """The child's stderr to ours as it comes, except its error lines, held to the end."""
    with os.fdopen(read_end, errors="replace") as lines:
        for line in lines:
            if line.startswith(error_prefix):
                held.append(line)
            else:
                sys.stderr.write(line)
                sys.stderr.flush()


def explain(log: str, job: Job, code: int) -> str:
    """The line for a child that JAX ended, from its log; "" for any other end."""
    last = _last_checkpoint(job.run_dir)
    resume = f"{last}; restart the job to resume"
    of = f" of {job.num_processes}" if job.num_processes else ""
    lost = _UNHEALTHY.search(log)
    if lost:
        ids = " and ".join(re.findall(r"\d+", lost.group(1)))
        return f"lost process {ids}{of} (no heartbeat for {job.heartbeat_seconds} s); {resume}"
    if _LEADER in log:
        return f"lost process 0{of}, the coordinator (it stopped answering); {resume}"
    fatal = _FATAL.findall(log)
    if code == 128 + signal.SIGABRT and fatal:
        return f"JAX ended this process: {fatal[-1][:200]}; {resume}"
    _, traceback_, crash = log.rpartition("Traceback (most recent call last):")
    if traceback_ and crash.strip():  # the child's own traceback, which it wrote to the log
        return f"the run failed: {crash.strip().splitlines()[-1][:300]}; {resume}"
    return ""


def _last_checkpoint(run_dir: Path | None) -> str:
    """The newest committed step, as the run dir's folder names say."""
    if run_dir is None:
        return "the run dir's newest checkpoint is where it resumes"
    with contextlib.suppress(OSError):
        steps = ckpt.committed_steps(run_dir / "checkpoints")
        if steps:
            return f"the last checkpoint is step {steps[-1]}"
    return "no checkpoint was written yet"


def _forward(child: int) -> Callable[[int, FrameType | None], None]:
    def forward(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    return forward


def _run_child(work: Callable[[], int], log_path: Path, stderr: int) -> None:
    """The child: in its own process group (the parent passes signals on, so the terminal's
    Ctrl-C arrives once), killed with its parent, C++ output to the log; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)
        _die_with_parent()
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 2)
        os.close(log)
        sys.stderr = os.fdopen(stderr, "w", buffering=1)
        code = work()
    except SystemExit as exit_:
        code = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # a crash: the traceback into the log, the parent says one line
        traceback.print_exc(file=sys.__stderr__)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()  # JAX's own shutdown of the job, as a normal exit runs it
        os._exit(code)


def _die_with_parent() -> None:
    """SIGKILL for the child when the parent dies (Linux), as a killed pod takes both."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _read(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-200_000:]
    return ""
