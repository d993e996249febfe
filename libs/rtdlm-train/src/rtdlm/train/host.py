"""Host memory: back XLA's per-step buffers with transparent huge pages.

Each call of a compiled step on the CPU allocates its temporary buffer afresh (480 MB for tiny
at batch 16 x 256), and glibc maps a block that large with mmap and unmaps it when the step
ends. Every step then faults the whole buffer in again in 4 KB pages: about 120,000 faults and
0.19 s of kernel time per tiny step on a 2-core machine. glibc's `glibc.malloc.hugetlb=1`
tunable asks the kernel for 2 MB pages on such mappings (where transparent huge pages are
`madvise` or `always`): a few hundred faults per step, and memory is still returned when freed.

glibc reads tunables only when a process starts, so a program that wants them restarts itself
once, first thing (`restart_with_huge_pages`); library users can export GLIBC_TUNABLES instead.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

TUNABLE = "glibc.malloc.hugetlb=1"
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


def huge_pages_environ(
    environ: Mapping[str, str],
    libc: tuple[int, int] | None,
    thp: str | None,
) -> dict[str, str] | None:
    """The environment to restart with for huge-page-backed large blocks, or None where
    GLIBC_TUNABLES already says how (`glibc.malloc.hugetlb=0` opts out) or the tunable cannot
    take effect (not glibc 2.35+, or the kernel's transparent huge pages are off or absent)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    name = TUNABLE.split("=")[0]
    chosen = any(item.split("=")[0] == name for item in tunables.split(":"))
    if chosen or libc is None or libc < (2, 35) or thp not in ("always", "madvise"):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def restart_with_huge_pages() -> None:
    """Replace this process with the same command line under TUNABLE, where that applies;
    otherwise return. Call it first in a program's entry point: whatever ran before it runs
    twice. The process id, open files and arguments stay the same."""
    environ = huge_pages_environ(os.environ, glibc_version(), transparent_huge_pages())
    if environ is None:
        return
    log.debug("restarting with GLIBC_TUNABLES=%s", environ["GLIBC_TUNABLES"])
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, *sys.orig_argv[1:]]  # this interpreter, this command line
    os.execve(sys.executable, argv, environ)  # nosec B606 # no shell: the same argv again
