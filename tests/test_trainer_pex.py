"""The packaged trainer PEX, run as a user runs it, in a subprocess."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_RUN

PEX = Path("apps.trainer/trainer.pex")


@pytest.mark.slow
def test_trainer_pex_trains_and_rejects_bad_input(tmp_path: Path) -> None:
    run = [sys.executable, str(PEX), "--run-dir", str(tmp_path / "run")]
    fast = [*SMALL_RUN, "--max-steps", "2", "--eval-every", "2", "--metrics-port", "0"]
    done = subprocess.run([*run, *fast], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "held-out loss" in done.stdout and "done: 2 steps" in done.stdout

    bad = subprocess.run([*run, "--preset", "huge"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "trainer: error: unknown preset 'huge'; choose one of tiny, small, medium, large"
    ]
