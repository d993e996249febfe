"""restart_with_huge_pages: a restarted process faults its step buffers in 2 MB pages.

Each case runs in its own process: glibc reads its tunables only when a process starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from rtdlm.train.host import TUNABLE, glibc_version, huge_pages_environ, transparent_huge_pages

# A jitted step whose temporary buffer (a 4096 x 4096 float32 product, 64 MB) is above glibc's
# largest mmap threshold (32 MB); the median page faults of its later calls.
STEP = """
import json, os, resource, statistics, sys
from rtdlm.train import host
if sys.argv[1] == "restart":
    host.restart_with_huge_pages()
import jax, jax.numpy as jnp
@jax.jit
def step(x):
    return jnp.tanh(x @ x.T) @ x
x = jnp.ones((4096, 32))
for _ in range(3):
    step(x).block_until_ready()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
tunables = os.environ.get("GLIBC_TUNABLES", "")
print(json.dumps({"pid": os.getpid(), "tunables": tunables, "faults": statistics.median(faults)}))
"""


def run(mode: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(PYTHONPATH=os.pathsep.join(sys.path), JAX_PLATFORMS="cpu")
    done = subprocess.Popen(
        [sys.executable, "-c", STEP, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    stdout, stderr = done.communicate(timeout=300)
    assert done.returncode == 0, stderr[-3000:]
    result: dict[str, object] = json.loads(stdout.strip().splitlines()[-1])
    assert result["pid"] == done.pid  # replaced in place, not a child
    return result


def test_a_restarted_process_faults_its_step_buffer_in_huge_pages() -> None:
    # What to expect follows from this machine: where the tunable cannot apply (another C
    # library, THP off) the restart is a no-op; with THP `always` every process has huge pages.
    thp = transparent_huge_pages()
    applies = huge_pages_environ({}, glibc_version(), thp) is not None
    default, restarted = run("default"), run("restart")
    assert default["tunables"] == ""
    assert restarted["tunables"] == (TUNABLE if applies else "")
    # 64 MB in 4 KB pages is 16,384 faults per call; in 2 MB pages, a few dozen.
    small_pages, huge_pages = 16_384 * 0.9, 0.05 * 16_384
    default_faults, restarted_faults = float(default["faults"]), float(restarted["faults"])  # type: ignore[arg-type]
    for faults, huge in (
        (default_faults, thp == "always"),
        (restarted_faults, applies or thp == "always"),
    ):
        assert faults < huge_pages if huge else faults > small_pages, (thp, default, restarted)


def test_the_tunable_is_added_once_where_it_applies_and_not_over_a_users_choice() -> None:
    glibc, thp = (2, 36), "madvise"
    assert huge_pages_environ({"A": "1"}, glibc, thp) == {"A": "1", "GLIBC_TUNABLES": TUNABLE}
    kept = huge_pages_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, glibc, thp)
    assert kept == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}"}
    assert huge_pages_environ({"GLIBC_TUNABLES": f"x=1:{TUNABLE}"}, glibc, thp) is None
    assert huge_pages_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, glibc, thp) is None
    assert huge_pages_environ({}, glibc, "always") is not None
    assert huge_pages_environ({}, glibc, "never") is None  # the kernel has them off
    assert huge_pages_environ({}, glibc, None) is None  # not Linux
    assert huge_pages_environ({}, (2, 34), thp) is None  # before the tunable existed
    assert huge_pages_environ({}, None, thp) is None  # musl, macOS
