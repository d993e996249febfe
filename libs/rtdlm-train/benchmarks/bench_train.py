"""Training-step throughput of the presets: tokens/s, MFU against a matmul probe, compile time.

Run: ./pants run libs/rtdlm-train/benchmarks:bench -- [--presets tiny small] [--steps 5]

The step is the trainer's own (AdamW, clipping, accumulation, non-finite guard). Machine speed
drifts, so every timed step is followed by a float32 matmul probe and MFU is their ratio; the
medians over steps are the numbers to compare.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import jax

from rtdlm.metrics import measure_matmul_flops
from rtdlm.model import build_with_stats, flops_per_token, param_count
from rtdlm.train import Batch, resolve
from rtdlm.train.data import split_documents, stdlib_documents
from rtdlm.train.loop import init_state, make_optimizer, make_train_step
from rtdlm.train.pipeline import packed_batches

BATCH = {"tiny": 8, "small": 2, "medium": 1, "large": 1}


def bench(name: str, steps: int, micro_batches: int) -> dict[str, float]:
    batch_size = BATCH[name] * micro_batches
    cfg = resolve(
        name,
        sets=[f"data.batch_size={batch_size}", f"data.micro_batches={micro_batches}"],
        vocab_size=256,
    )
    model = build_with_stats(cfg.model)
    optimizer = make_optimizer(cfg.optimizer, 1000)
    state = init_state(model, optimizer, cfg)
    step = make_train_step(model, optimizer, cfg)
    stream = packed_batches(
        split_documents(stdlib_documents()).train, batch_size, cfg.model.seq_len, 0
    )
    batches = [Batch(t, s) for t, s, _ in itertools.islice(stream, steps + 1)]
    start = time.perf_counter()
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics.loss)
    compile_s = time.perf_counter() - start
    n_tokens = batch_size * cfg.model.seq_len
    step_flops = flops_per_token(cfg.model) * n_tokens
    rates, mfus = [], []
    for batch in batches[1:]:
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics.loss)
        seconds = time.perf_counter() - start
        probe = measure_matmul_flops(repeats=3)  # right beside the step it is compared with
        rates.append(n_tokens / seconds)
        mfus.append(step_flops / seconds / probe)
    return {
        "params": param_count(cfg.model),
        "tokens/step": n_tokens,
        "compile+first s": compile_s,
        "tokens/s": statistics.median(rates),
        "MFU vs matmul": statistics.median(mfus),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=list(BATCH))
    parser.add_argument("--steps", type=int, default=5, help="timed steps after compilation")
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation")
    args = parser.parse_args()
    print(
        f"{'preset':8s} {'params':>12s} {'tokens/step':>12s} {'compile s':>10s} "
        f"{'tokens/s':>10s} {'MFU':>7s}"
    )
    for name in args.presets:
        row = bench(name, args.steps, args.micro_batches)
        print(
            f"{name:8s} {row['params']:12,.0f} {row['tokens/step']:12,.0f} "
            f"{row['compile+first s']:10.1f} {row['tokens/s']:10,.0f} {row['MFU vs matmul']:7.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
