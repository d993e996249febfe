import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest


def find_tool(name: str) -> str | None:
    """A binary on PATH, or in Debian's /usr/bin or /usr/sbin (not always on a sandbox's PATH)."""
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/bin") / name, Path("/usr/sbin") / name) if p.exists()), None
    )


def missing_tool(message: str, required_by: str) -> NoReturn:
    """A tool a test needs is not installed: skipped here, a failure where CI installed the
    tools and set `required_by` (RTDLM_REQUIRE_MONITORING_TOOLS, RTDLM_REQUIRE_INFRA_TOOLS)."""
    if os.environ.get(required_by):
        pytest.fail(message)
    pytest.skip(message)


def venv_tool(variable: str, what: str, script: str, required_by: str) -> str:
    """The command a build-support venv script made, as `variable` names it (CI exports it),
    else `missing_tool`."""
    command = os.environ.get(variable)
    if command:
        return command
    missing_tool(
        f"{variable} names no {what}, so this test cannot run: build-support/{script} makes "
        "one and prints its path",
        required_by,
    )


@pytest.fixture
def tool() -> Callable[[str], str]:
    """Path of a Debian monitoring binary (build-support/install-monitoring-tools.sh)."""

    def find(name: str) -> str:
        path = find_tool(name)
        if path is not None:
            return path
        missing_tool(
            f"{name} is not installed, so this monitoring test cannot run: "
            "build-support/install-monitoring-tools.sh installs it (Debian's packages)",
            "RTDLM_REQUIRE_MONITORING_TOOLS",
        )

    return find


@pytest.fixture(scope="session")
def hf_python() -> str:
    """A Python with transformers and torch (build-support/hf-venv.sh): $RTDLM_HF_PYTHON."""
    return venv_tool(
        "RTDLM_HF_PYTHON", "Python with transformers", "hf-venv.sh", "RTDLM_REQUIRE_HF"
    )


# The run the app tests train unless a test needs another: the tiny preset at one layer of d_model
# 64 on batches of 2 x 32 tokens, without the closing sample. The same shapes in every file, so
# the test run's shared compilation cache (pants.toml) compiles each step once. A configured peak:
# measuring one takes each trainer process seconds of matmuls, and MFU is the metrics tests' job.
SMALL_RUN = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--sample-tokens", "0"]
SMALL_RUN += ["--set", "model.num_layers=1", "--set", "model.d_model=64", "--peak-flops", "1e12"]

# A run a test interrupts (kill, signal, storage cut) that resumes to the 20-step runs above:
# their learning-rate schedule, but steps enough that it cannot finish before the interruption
# lands, however late the test sees the line it waits for on a loaded machine (and few enough
# that the trainer still prints every step).
INTERRUPTED = ["--max-steps", "500", "--set", "optimizer.decay_steps=20"]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on right now (all held
    while they are picked: one at a time, the system may hand out the same port twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


@contextlib.contextmanager
def serving(
    command: list[str],
    ready: str | urllib.request.Request,
    log: Path,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    """A test server (moto, MLflow) for the `with` block: started with its output in `log`,
    since a pipe nobody reads fills and stalls it, and ready once `ready` (a URL or request)
    answers with success; terminated after."""
    with log.open("w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with urllib.request.urlopen(ready, timeout=2):  # nosec B310 # loopback
                    break
            except OSError:  # not listening yet, or an error status
                assert server.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"{command[0]} did not start in {timeout} s"
                time.sleep(0.2)
        yield server
    finally:
        server.terminate()
        server.wait(timeout=30)


def start_trainer(*args: str, stderr: int = subprocess.PIPE) -> subprocess.Popen:
    """The trainer app as its own process (what signals, locks and multi-host runs need), on
    this test's sys.path and on the CPU; `stderr=subprocess.STDOUT` merges the two streams."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "rtdlm_trainer.main", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )
