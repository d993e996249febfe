"""Model FLOPs utilization: achieved model FLOP/s over the accelerator's peak FLOP/s."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp

# Dense bf16 tensor-core peaks from the vendor data sheets, in FLOP/s (no sparsity).
PEAK_BF16_FLOPS = {
    "h200": 989.4e12,
    "h100 pcie": 756.0e12,
    "h100": 989.4e12,
    "a100": 312.0e12,
}


@dataclass(frozen=True)
class Peak:
    flops_per_second: float
    source: str  # "config", "table: <key>" or "measured: <n>x<n> <dtype> matmul"


def peak_from_table(device_kind: str) -> Peak | None:
    kind = device_kind.lower()
    for key, flops in PEAK_BF16_FLOPS.items():  # most specific keys first
        if all(part in kind for part in key.split()):
            return Peak(flops, f"table: {key}")
    return None


# One jitted function, so a probe beside every step compiles once per shape and dtype.
_matmul = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))


def measure_matmul_flops(n: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
    """Best FLOP/s of an n x n matmul on the default device, a CPU's practical peak: `dtype`
    inputs accumulating in float32, the way the model's matmuls are written (on CPUs with
    bf16 units a bf16 dot with a bf16 result runs slower than float32)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    jax.block_until_ready(_matmul(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(_matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def peak_flops(
    configured: float | None = None, device: jax.Device | None = None, dtype: str = "float32"
) -> Peak:
    """The configured peak, else the table's for a known accelerator, else a measured matmul
    of the compute dtype (so bf16 training is not measured against the float32 ceiling)."""
    if configured is not None:
        if configured <= 0:
            raise ValueError(f"peak FLOP/s must be positive, got {configured}")
        return Peak(configured, "config")
    device = device or jax.local_devices()[0]
    if (known := peak_from_table(device.device_kind)) is not None:
        return known
    return Peak(measure_matmul_flops(dtype=dtype), f"measured: 1024x1024 {dtype} matmul")


def model_flops_utilization(flops: float, seconds: float, peak: float) -> float:
    return flops / seconds / peak if seconds > 0 and peak > 0 else 0.0
