"""Forward+backward throughput of the presets on this machine, as a fraction of its matmul speed.

Run: ./pants run libs/rtdlm-model/benchmarks:bench -- [--presets tiny small] [--rounds 3]

Machine speed drifts between runs, so each round times a float32 matmul probe right before
the model step and reports the ratio of the two; the median ratio is the number to compare.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from rtdlm.model import build, flops_per_token, param_count, preset


def seconds(fn: Callable[[], jax.Array], repeats: int) -> float:
    """Best wall time of `repeats` calls (already compiled), each waited for."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def matmul_probe(n: int = 1024) -> tuple[Callable[[], jax.Array], float]:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)  # operands as arguments: a closed-over product is constant-folded
    jax.block_until_ready(matmul(a, b))
    return lambda: matmul(a, b), 2.0 * n**3


def model_step(name: str, batch_size: int) -> tuple[Callable[[], jax.Array], float, int]:
    cfg = preset(name, vocab_size=256)
    model = build(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch_size, cfg.seq_len + 1), 0, 256)
    params = model.init(jax.random.PRNGKey(0), tokens[:, :-1])

    def loss(p: dict) -> jax.Array:
        logits = model.apply(p, None, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    grad = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    jax.block_until_ready(grad(params))
    compile_seconds = time.perf_counter() - start
    print(f"{name}: {param_count(cfg):,} params, compile+first step {compile_seconds:.1f}s")
    n_tokens = batch_size * cfg.seq_len
    return lambda: grad(params)[0], flops_per_token(cfg) * n_tokens, n_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    probe, probe_flops = matmul_probe()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    print("preset  tokens/s  model GFLOP/s  matmul GFLOP/s  model/matmul")
    for name in args.presets:
        step, step_flops, n_tokens = model_step(name, args.batch_size)
        ratios, rates, probes = [], [], []
        for _ in range(args.rounds):  # A (probe) and B (model) alternate within each round
            probe_rate = probe_flops / seconds(probe, 5)
            step_seconds = seconds(step, 2)
            rates.append(n_tokens / step_seconds)
            probes.append(probe_rate)
            ratios.append(step_flops / step_seconds / probe_rate)
        print(
            f"{name:7s} {statistics.median(rates):9,.0f} "
            f"{statistics.median(rates) * step_flops / n_tokens / 1e9:14.1f} "
            f"{statistics.median(probes) / 1e9:15.1f} {statistics.median(ratios):13.3f}"
        )


if __name__ == "__main__":
    main()
