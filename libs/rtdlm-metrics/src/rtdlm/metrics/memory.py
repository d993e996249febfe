"""Memory readings: the accelerator's own statistics, and the process's resident host memory."""

from __future__ import annotations

import os
import resource
import sys

import jax


def device_memory(device: jax.Device) -> tuple[int, int | None] | None:
    """(bytes in use, bytes limit) from the accelerator; None where it keeps none (CPU)."""
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats()
    except Exception:  # backends without statistics raise rather than return None
        return None
    if not stats or "bytes_in_use" not in stats:
        return None
    return int(stats["bytes_in_use"]), stats.get("bytes_limit")


def host_memory_used_bytes() -> int:
    """Resident set size of this process now (Linux), else its peak (other systems)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
