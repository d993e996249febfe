import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def tool() -> Callable[[str], str]:
    """Path of a Debian monitoring binary. Missing: skipped here, a failure in CI, which
    installs them and sets RTDLM_REQUIRE_MONITORING_TOOLS=1 so these tests can never skip there."""

    def find(name: str) -> str:
        path = shutil.which(name) or next(
            (str(p) for p in (Path("/usr/bin") / name, Path("/usr/sbin") / name) if p.exists()),
            None,
        )
        if path is not None:
            return path
        message = (
            f"{name} is not installed, so this monitoring test cannot run: "
            "build-support/install-monitoring-tools.sh installs it (Debian's packages)"
        )
        if os.environ.get("RTDLM_REQUIRE_MONITORING_TOOLS"):
            pytest.fail(message)
        pytest.skip(message)

    return find
