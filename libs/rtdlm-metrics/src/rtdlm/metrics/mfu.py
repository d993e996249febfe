"""Model FLOPs utilization: achieved model FLOP/s over a ceiling the device can really reach.

One definition for the trainer, the metrics and the benchmarks: the peak is the configured
one, else the data sheet's for a known accelerator, else (CPUs) the best of matmul probes of
several sizes in every form the model's dots may take. A utilization is never above 1: a step
that beats the peak proves the peak low, and `utilization` raises it to what was achieved.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

# Dense bf16 tensor-core peaks from the vendor data sheets, in FLOP/s (no sparsity).
PEAK_BF16_FLOPS = {
    "h200": 989.4e12,
    "h100 pcie": 756.0e12,
    "h100": 989.4e12,
    "a100": 312.0e12,
}

# A single size is a poor ceiling: which one runs fastest depends on the CPU's caches and on
# the dot kernel XLA picks, and the model's own dots may beat any one of them.
PROBE_SIZES = (512, 1024, 2048)

# A raised peak's source: this, then the source of the peak first given.
RAISED = "raised to what a step achieved, above "


@dataclass(frozen=True)
class Peak:
    flops_per_second: float
    source: str  # "config", "table: <key>", "measured: ..." or RAISED + the first source


def peak_from_table(device_kind: str) -> Peak | None:
    kind = device_kind.lower()
    for key, flops in PEAK_BF16_FLOPS.items():  # most specific keys first
        if all(part in kind for part in key.split()):
            return Peak(flops, f"table: {key}")
    return None


def best_seconds(fn: Callable[..., Any], *args: Any, repeats: int, warm: bool = True) -> float:
    """The best wall time of `repeats` calls of `fn(*args)`, each waited for (a busy machine
    only ever adds time), after one untimed call that compiles it unless `warm` is False."""
    if warm:
        jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def _matmul(out: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """One jitted dot per result dtype, so probes compile once per shape and dtype. The operands
    are arguments: a product of closed-over constants would be folded at compile time."""
    return jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.dtype(out)))


def measure_matmul_flops(
    n: int = 1024, repeats: int = 5, dtype: str = "float32", out: str = "float32"
) -> float:
    """Best FLOP/s of an n x n matmul on the default device: `dtype` inputs with an `out`
    result (float32 by default: the way the model's matmuls are written)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    return 2.0 * n**3 / best_seconds(_matmul(out), a, b, repeats=repeats)


def probe_forms(dtype: str) -> tuple[str, ...]:
    """Input dtypes a model computing in `dtype` runs its dots in: float32 always (a bf16
    model keeps some float32 dots, and on CPUs without bf16 matrix units they are the faster
    form), and the compute dtype accumulating in float32."""
    return tuple(dict.fromkeys(("float32", str(jnp.dtype(dtype)))))


def measure_peak(
    dtype: str = "float32", sizes: tuple[int, ...] = PROBE_SIZES, repeats: int = 3
) -> Peak:
    """The best FLOP/s of any probe size in any of `probe_forms(dtype)`."""
    rates = {
        (n, form): measure_matmul_flops(n, repeats, form)
        for form in probe_forms(dtype)
        for n in sizes
    }
    (n, form), best = max(rates.items(), key=lambda item: item[1])
    forms = " and ".join(f"{form}->float32" for form in probe_forms(dtype))
    return Peak(best, f"measured: best {form} {n}x{n} of {forms} matmuls, sizes {sizes}")


def peak_flops(
    configured: float | None = None, device: jax.Device | None = None, dtype: str = "float32"
) -> Peak:
    """The configured peak, else the table's for a known accelerator, else `measure_peak` of
    the compute dtype (so bf16 training is not held to the float32 ceiling alone), measured
    once per process and dtype: the probes take seconds and the ceiling does not move."""
    if configured is not None:
        if configured <= 0:
            raise ValueError(f"peak FLOP/s must be positive, got {configured}")
        return Peak(configured, "config")
    device = device or jax.local_devices()[0]
    if (known := peak_from_table(device.device_kind)) is not None:
        return known
    return _measured_peak(dtype)


@functools.cache
def _measured_peak(dtype: str) -> Peak:
    return measure_peak(dtype)


def utilization(flops: float, seconds: float, peak: Peak) -> tuple[float, Peak]:
    """MFU of `flops` done in `seconds`, and the peak to hold later steps to: where the step
    ran faster than `peak`, the peak was wrong, so it is raised to the achieved rate (MFU 1)."""
    if seconds <= 0:
        return 0.0, peak
    achieved = flops / seconds
    if achieved <= peak.flops_per_second:
        return achieved / peak.flops_per_second, peak
    first = peak.source.split(RAISED, 1)[-1]
    return 1.0, Peak(achieved, f"{RAISED}{first}")
