"""restart_with_tunables: a restarted process reuses its step buffers instead of faulting them in.

Each case runs in its own process: glibc reads its tunables only when a process starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rtdlm.train.host import (
    HUGE_PAGES,
    REUSE,
    accelerator,
    glibc_version,
    transparent_huge_pages,
    tunables_environ,
    wanted_tunables,
)

# A jitted step whose temporary buffer (a 4096 x 4096 float32 product, 64 MB) is above glibc's
# largest mmap threshold (32 MB); the median page faults of its later calls.
STEP = """
import json, os, resource, statistics, sys
from rtdlm.train import host
if sys.argv[1] == "restart":
    host.restart_with_tunables()
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


def test_a_restarted_process_reuses_its_step_buffer() -> None:
    # What to expect follows from this machine: where the tunables cannot apply (another C
    # library) the restart is a no-op; with THP `always` every process has huge pages.
    thp = transparent_huge_pages()
    wanted = ":".join(wanted_tunables(glibc_version(), thp, accelerator(os.environ)))
    default, restarted = run("default"), run("restart")
    assert default["tunables"] == ""
    assert restarted["tunables"] == wanted
    # 64 MB in 4 KB pages is 16,384 faults per call; in 2 MB pages, a few dozen; reused, none.
    default_faults, restarted_faults = float(default["faults"]), float(restarted["faults"])  # type: ignore[arg-type]
    if thp == "always":
        assert default_faults < 0.05 * 16_384, default
    else:
        assert default_faults > 0.9 * 16_384, default
    if wanted:
        # Reused, the buffer takes no faults at all (30 of 30 processes here); once, under
        # Pants, a process took 44 a call, as if faulting it in 2 MB pages: bound by that.
        assert restarted_faults < 0.05 * 16_384, restarted
    else:
        assert restarted_faults == pytest.approx(default_faults, rel=0.5), (default, restarted)


def test_the_tunables_are_added_once_where_they_apply_and_not_over_a_users_choice() -> None:
    glibc, thp = (2, 36), "madvise"
    every = ":".join((*REUSE, HUGE_PAGES))
    assert tunables_environ({"A": "1"}, glibc, thp) == {"A": "1", "GLIBC_TUNABLES": every}
    # a user's own tunables stay, theirs win where they name one of ours
    mine = "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"
    kept = tunables_environ({"GLIBC_TUNABLES": mine}, glibc, thp)
    assert kept == {"GLIBC_TUNABLES": ":".join((mine, *REUSE[1:]))}
    assert tunables_environ({"GLIBC_TUNABLES": f"x=1:{every}"}, glibc, thp) is None  # restarted
    assert tunables_environ({}, glibc, "always") == {"GLIBC_TUNABLES": every}
    assert tunables_environ({}, glibc, "never") == {"GLIBC_TUNABLES": ":".join(REUSE)}  # no THP
    assert tunables_environ({}, glibc, None) == {"GLIBC_TUNABLES": ":".join(REUSE)}
    assert tunables_environ({}, (2, 34), thp) == {"GLIBC_TUNABLES": ":".join(REUSE)}  # no hugetlb
    assert tunables_environ({}, (2, 25), thp) is None  # before tunables existed
    assert tunables_environ({}, None, thp) is None  # musl, macOS
    # steps on a GPU or TPU: their buffers are on the device, so only huge pages are asked for
    assert tunables_environ({}, glibc, thp, on_accelerator=True) == {"GLIBC_TUNABLES": HUGE_PAGES}
    assert tunables_environ({}, (2, 34), thp, on_accelerator=True) is None


def test_an_accelerator_is_what_jax_would_pick_first() -> None:
    assert accelerator({"JAX_PLATFORMS": "cuda,cpu"})
    assert accelerator({"JAX_PLATFORMS": "tpu"})
    assert not accelerator({"JAX_PLATFORMS": "cpu"})
    assert not accelerator({"JAX_PLATFORMS": " cpu , cuda"})
    assert not accelerator({})  # the cpu resolve installs no PJRT plugin and no libtpu
