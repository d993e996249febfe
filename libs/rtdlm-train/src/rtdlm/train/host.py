"""Host memory: keep XLA's per-step buffers mapped from one step to the next.

Each call of a compiled step on the CPU allocates its temporary buffer afresh (480 MB for tiny
at batch 16 x 256, 5.7 GB for small at 4 x 1024) and frees it when the step ends. glibc serves
a block that large with a fresh mmap and unmaps it on free, so every step faulted the whole
buffer in again and the kernel zeroed it: 3 s of kernel time in a 12 s small step on 2 cores,
even in 2 MB pages. Four glibc tunables make the block a reused one instead:

- `glibc.malloc.arena_max=1`: every thread allocates from the main arena, whose heap can grow
  to any size (a thread's own arena maps blocks past its 64 MB heaps whatever mmap_max says);
- `glibc.malloc.mmap_max=0`: large blocks come from that heap rather than their own mappings;
- `glibc.malloc.trim_threshold`: freed memory at the heap's top stays with the process, so the
  next step finds its buffer already faulted in (the process keeps its peak heap);
- `glibc.malloc.hugetlb=1`: the heap is backed by transparent huge pages where the kernel
  offers them (`madvise` or `always`): fewer TLB misses, and 2 MB faults the first time.

The first three fix a cost of XLA:CPU's step buffers and were measured only there: where jax
will run on a GPU or TPU, step buffers live on the device, and only huge pages are asked for (a
host that keeps its peak heap would hold every checkpoint's host copy for good).

glibc reads tunables only when a process starts, so a program that wants them restarts itself
once, first thing (`restart_with_tunables`); library users can export GLIBC_TUNABLES instead.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

REUSE = (
    "glibc.malloc.arena_max=1",
    "glibc.malloc.mmap_max=0",
    "glibc.malloc.trim_threshold=1099511627776",
)
HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the glibc this process runs on, or None for another C library."""
    try:
        name, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (ValueError, OSError, AttributeError):
        return None


def transparent_huge_pages() -> str | None:
    """The kernel's transparent huge page mode (always, madvise or never); None off Linux."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return None
    selected = [word.strip("[]") for word in text.split() if word.startswith("[")]
    return selected[0] if selected else None


def accelerator(environ: Mapping[str, str]) -> bool:
    """Whether jax will run on a GPU or TPU: JAX_PLATFORMS names one first or, where it is unset,
    a PJRT plugin (jax-cuda12-plugin, say) or libtpu is installed, as jax itself looks for them."""
    platforms = [name.strip() for name in environ.get("JAX_PLATFORMS", "").split(",")]
    if platforms[0]:
        return platforms[0] != "cpu"
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return bool(plugins) or any(importlib.util.find_spec(m) for m in ("jax_plugins", "libtpu"))


def wanted_tunables(
    libc: tuple[int, int] | None, thp: str | None, on_accelerator: bool = False
) -> tuple[str, ...]:
    """The tunables that take effect here: the reuse ones from glibc 2.26 (tunables' first
    release) where steps run on the CPU, huge pages from glibc 2.35 where the kernel's
    transparent huge pages are on."""
    if libc is None or libc < (2, 26):
        return ()
    reuse = () if on_accelerator else REUSE
    huge = libc >= (2, 35) and thp in ("always", "madvise")
    return (*reuse, HUGE_PAGES) if huge else reuse


def tunables_environ(
    environ: Mapping[str, str],
    libc: tuple[int, int] | None,
    thp: str | None,
    on_accelerator: bool = False,
) -> dict[str, str] | None:
    """The environment to restart with, or None where there is nothing to add: each wanted
    tunable that GLIBC_TUNABLES does not name already (a user's own value, `hugetlb=0` say,
    is kept)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    named = {item.partition("=")[0] for item in tunables.split(":")}
    wanted = wanted_tunables(libc, thp, on_accelerator)
    added = [t for t in wanted if t.partition("=")[0] not in named]
    if not added:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, *added]))}


def restart_with_tunables() -> None:
    """Replace this process with the same command line under the wanted tunables, where that
    adds any; otherwise return. Call it first in a program's entry point: whatever ran before
    it runs twice. The process id, open files and arguments stay the same."""
    environ = tunables_environ(
        os.environ, glibc_version(), transparent_huge_pages(), accelerator(os.environ)
    )
    if environ is None:
        return
    log.debug("restarting with GLIBC_TUNABLES=%s", environ["GLIBC_TUNABLES"])
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, *sys.orig_argv[1:]]  # this interpreter, this command line
    os.execve(sys.executable, argv, environ)  # nosec B606 # no shell: the same argv again
