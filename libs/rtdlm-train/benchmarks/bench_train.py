"""Training throughput of the presets: the step alone, and the whole run loop.

Run: ./pants run libs/rtdlm-train/benchmarks:bench -- [--presets tiny small] [--steps 5] [--loop]

`step` times the trainer's compiled step (AdamW, clipping, accumulation, non-finite guard)
with a wait after each; `--loop` runs the real Trainer (data prefetch, metrics read one step
late, callbacks, steps.jsonl) and times its steps as reported. Machine speed drifts, so every
number is paired with the trainer's MFU peak (rtdlm.metrics.measure_peak) taken beside it.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time

import jax

from rtdlm.data.corpus import split_documents, stdlib_documents
from rtdlm.data.pipeline import packed_batches
from rtdlm.metrics import measure_peak, utilization
from rtdlm.model import build_with_stats, flops_per_token, param_count
from rtdlm.train import Batch, Callback, StepLog, Trainer, resolve
from rtdlm.train.config import RunConfig, for_first_start
from rtdlm.train.loop import init_state, make_optimizer, make_train_step

BATCH = {"tiny": 8, "small": 2, "medium": 1, "large": 1}
DATA = split_documents(stdlib_documents())


def config(name: str, micro_batches: int, steps: int, *sets: str) -> RunConfig:
    batch_size = BATCH[name] * micro_batches
    sets = (f"data.batch_size={batch_size}", f"data.micro_batches={micro_batches}", *sets)
    return for_first_start(
        resolve(name, sets=[*sets, f"train.max_steps={steps}", "metrics.enabled=false"])
    )


def bench_step(cfg: RunConfig, steps: int) -> dict[str, float]:
    model = build_with_stats(cfg.model)
    optimizer = make_optimizer(cfg.optimizer)
    state = init_state(model, optimizer, cfg)
    step = make_train_step(model, optimizer, cfg)
    stream = packed_batches(DATA.train, cfg.data.batch_size, cfg.model.seq_len, 0)
    batches = [Batch(t, s) for t, s, _ in itertools.islice(stream, steps + 1)]
    start = time.perf_counter()
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics.loss)
    compile_s = time.perf_counter() - start
    n_tokens = cfg.data.batch_size * cfg.model.seq_len
    rates, mfus = [], []
    for batch in batches[1:]:
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics.loss)
        seconds = time.perf_counter() - start
        peak = measure_peak(cfg.model.compute_dtype)  # beside the step it is compared with
        rates.append(n_tokens / seconds)
        mfus.append(utilization(flops_per_token(cfg.model) * n_tokens, seconds, peak)[0])
    return {
        "compile s": compile_s,
        "tokens/s": statistics.median(rates),
        "MFU": statistics.median(mfus),
    }


class Clock(Callback):
    def __init__(self) -> None:
        self.logs: list[StepLog] = []

    def on_step(self, log: StepLog) -> None:
        self.logs.append(log)


def bench_loop(cfg: RunConfig, steps: int) -> dict[str, float]:
    """The Trainer's own step times after two warm-up steps, with probes before and after."""
    clock = Clock()
    before = measure_peak(cfg.model.compute_dtype)
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        Trainer(cfg, DATA, run_dir, [clock], compile_cache=False).run()
        total = time.perf_counter() - start
    after = measure_peak(cfg.model.compute_dtype)
    peak = max(before, after, key=lambda p: p.flops_per_second)
    timed = clock.logs[2:]
    seconds = sum(log.step_seconds for log in timed)
    tokens = sum(log.tokens for log in timed)
    return {
        "compile s": clock.logs[0].step_seconds,
        "tokens/s": tokens / seconds,
        "MFU": utilization(sum(log.flops for log in timed), seconds, peak)[0],
        "run s": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=list(BATCH))
    parser.add_argument("--steps", type=int, default=5, help="timed steps after compilation")
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation")
    parser.add_argument("--loop", action="store_true", help="time the whole Trainer loop")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE")
    args = parser.parse_args()
    print(
        f"{'preset':8s} {'params':>12s} {'tokens/step':>12s} {'compile s':>10s} "
        f"{'tokens/s':>10s} {'MFU':>7s}"
    )
    for name in args.presets:
        if args.loop:  # eval and checkpoint only at the end: the loop's steady state
            steps = args.steps + 2
            every = [f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
            row = bench_loop(config(name, args.micro_batches, steps, *every, *args.sets), steps)
        else:
            row = bench_step(config(name, args.micro_batches, args.steps, *args.sets), args.steps)
        cfg = config(name, args.micro_batches, 1, *args.sets)
        print(
            f"{name:8s} {param_count(cfg.model):12,.0f} "
            f"{cfg.data.batch_size * cfg.model.seq_len:12,.0f} {row['compile s']:10.1f} "
            f"{row['tokens/s']:10,.0f} {row['MFU']:7.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
