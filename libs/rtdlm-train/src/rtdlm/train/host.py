"""Host memory: keep the pages of XLA's per-step buffers on the CPU.

Each call of a compiled step on the CPU allocates its temporary buffer (590 MB for tiny at
batch 16 x 256) from the thread that runs it. glibc serves a request that large from a fresh
mmap when the thread has an arena of its own, and unmaps it when the step ends, so every step
faults the whole buffer in again: about 155,000 page faults and 0.35 s of kernel time per tiny
step on a 2-core machine. With one arena that neither maps nor trims large blocks, the freed
buffer stays in the heap and the next step reuses its pages.

glibc fixes a thread's arena when the thread first allocates, so this works only before JAX
starts its CPU backend (the first computation or device query); later it changes nothing.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")


def cpu_backend_expected(environ: dict[str, str] | None = None) -> bool:
    """Whether JAX will compute on the CPU: JAX_PLATFORMS names cpu first, or it is unset and
    no accelerator plugin is installed."""
    platforms = (os.environ if environ is None else environ).get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (one arena, no mmap, no trim) when JAX will run
    on the CPU. Call it before JAX's first computation. Returns whether it was applied; on
    other C libraries, or with an accelerator, it does nothing."""
    if not cpu_backend_expected():
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: mallopt differs elsewhere
        return False
    applied = all(
        libc.mallopt(param, value) == 1
        for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
    )
    log.debug("glibc keeps freed memory for reuse: %s", applied)
    return applied
