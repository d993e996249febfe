"""Forward+backward throughput and compile time of the presets, with and without scan_layers.

Run: ./pants run libs/rtdlm-model/benchmarks:bench -- [--presets small medium] [--scan both]

Machine speed drifts between runs (and on a shared machine, within one), so the variants of
a preset are timed in alternation, A B A B ..., each step beside the trainer's float32 matmul
probe (rtdlm.metrics.measure_matmul_flops). The
numbers to compare are medians: tokens/s, its ratio to the probe's speed, and the ratio
scan/loop taken within each round.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import haiku as hk
import jax
import optax

from rtdlm.metrics import best_seconds, measure_matmul_flops
from rtdlm.model import ModelConfig, build, flops_per_token, param_count, preset, stack_layers


class Step(NamedTuple):
    run: Callable[[], jax.Array]  # one compiled forward+backward, loss returned
    trace_seconds: float  # jit tracing and lowering to HLO
    compile_seconds: float  # XLA compilation
    temp_bytes: int  # XLA's temporary buffers: activations and gradients in flight

    @property
    def build_seconds(self) -> float:
        return self.trace_seconds + self.compile_seconds


def model_step(cfg: ModelConfig, params: hk.Params, tokens: jax.Array) -> Step:
    """Compiles forward+backward; params may be shapes only (jax.ShapeDtypeStruct)."""
    model = build(cfg)

    def loss(p: hk.Params) -> jax.Array:
        logits = model.apply(p, None, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    trace_seconds = compile_seconds = float("inf")
    for _ in range(2):  # the best of two: a compile is timed once otherwise, on a busy machine
        start = time.perf_counter()
        lowered = jax.jit(jax.value_and_grad(loss)).lower(params)
        traced = time.perf_counter()
        compiled = lowered.compile()
        done = time.perf_counter()
        trace_seconds = min(trace_seconds, traced - start)
        compile_seconds = min(compile_seconds, done - traced)
    memory = compiled.memory_analysis()
    temp = int(getattr(memory, "temp_size_in_bytes", 0)) if memory is not None else 0
    return Step(lambda: compiled(params)[0], trace_seconds, compile_seconds, temp)


def bench_preset(
    base: ModelConfig, name: str, variants: list[bool], batch: int, steps: int
) -> None:
    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, base.seq_len + 1), 0, 256)
    init = jax.jit(build(base).init)
    if steps:
        looped = init(jax.random.PRNGKey(0), tokens[:, :-1])
    else:  # compile only: shapes are enough, and configs too big to run still compile
        looped = jax.eval_shape(init, jax.random.PRNGKey(0), tokens[:, :-1])
    n_tokens = batch * base.seq_len
    step_flops = flops_per_token(base) * n_tokens
    print(
        f"\n{name}: {param_count(base):,} params, {base.num_layers} layers, "
        f"batch {batch} x {base.seq_len} tokens, remat {base.remat}"
    )
    compiled: dict[bool, Step] = {}
    for scan in variants:  # the same numbers in both layouts
        cfg = dataclasses.replace(base, scan_layers=scan)
        params = looped
        if scan:
            to_scanned = functools.partial(stack_layers, cfg=cfg)
            params = to_scanned(looped) if steps else jax.eval_shape(to_scanned, looped)
        compiled[scan] = step = model_step(cfg, params, tokens)
        if steps:
            jax.block_until_ready(step.run())  # warm-up, untimed
    rates: dict[bool, list[float]] = {scan: [] for scan in variants}
    of_probe: dict[bool, list[float]] = {scan: [] for scan in variants}
    for _ in range(steps):  # A B A B ...: each variant's step right after its own probe
        for scan in variants:
            probe_rate = measure_matmul_flops(1024, repeats=3)
            step_seconds = best_seconds(compiled[scan].run, repeats=1, warm=False)
            rates[scan].append(n_tokens / step_seconds)
            of_probe[scan].append(step_flops / step_seconds / probe_rate)
    print("variant  trace s  compile s  temp GB  tokens/s  model/matmul  (per step tokens/s)")
    for scan in variants:
        step = compiled[scan]
        label = "scan" if scan else "loop"
        timed = "        -             -"
        if steps:
            timed = (
                f"{statistics.median(rates[scan]):9,.0f} {statistics.median(of_probe[scan]):13.3f}"
                f"  ({' '.join(f'{r:,.0f}' for r in rates[scan])})"
            )
        print(
            f"{label:7s} {step.trace_seconds:8.1f} {step.compile_seconds:10.1f} "
            f"{step.temp_bytes / 1e9:8.2f} {timed}"
        )
    if len(variants) == 2:
        a, b = compiled[False], compiled[True]
        line = (
            f"scan/loop: compile {b.compile_seconds / a.compile_seconds:.2f}x, "
            f"trace+compile {b.build_seconds / a.build_seconds:.2f}x"
        )
        if steps:
            paired = [s / loop for s, loop in zip(rates[True], rates[False], strict=True)]
            line += (
                f", tokens/s {statistics.median(paired):.3f}x (median of rounds; "
                f"{', '.join(f'{r:.3f}' for r in paired)})"
            )
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--scan", choices=["both", "on", "off"], default="both")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: 2048 tokens a step (small: 2)"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps each; 0: compile only")
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots_saveable"])
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    args = parser.parse_args()
    variants = {"both": [False, True], "on": [True], "off": [False]}[args.scan]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    measure_matmul_flops(1024, repeats=1)  # starts the backend before anything is timed
    for name in args.presets:
        cfg = preset(name, vocab_size=256, remat=args.remat)
        cfg = dataclasses.replace(cfg, seq_len=args.seq_len or cfg.seq_len)
        batch = args.batch_size or max(1, 2048 // cfg.seq_len)
        bench_preset(cfg, name, variants, batch, args.steps)


if __name__ == "__main__":
    main()
