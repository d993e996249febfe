"""A short GPU benchmark: one preset's training step under each remat policy, at the largest
batch the dry-run planner fits in device memory, with MFU against the device's bf16 dense peak.

Run on one H200 (medium, bfloat16, cuDNN attention, remat none / full / dots_saveable; a few
minutes; the target is MFU >= 0.45 against the H200's bf16 dense peak):

    ./pants run benchmarks/gpu:gpu-cuda12 -- --out gpu.json

Each policy: plan the batch (the trainer's --dry-run arithmetic, to --fill of the device's
bytes_limit), compile ahead of time (the compiled program's own bytes are checked against the
whole limit before anything is allocated, and the batch shrinks if they do not fit), one
untimed step, then --steps timed steps, each waited for. "compiled GiB" is the policy's own
program; "device peak GiB" is the process's high-water mark so far (JAX cannot reset it), an
upper bound for each policy after the first.

On CPU there is no memory limit to read and no table peak: pass --memory-gib and an attention
that runs there (blocked or xla), and MFU is against a measured matmul of the compute dtype,
labelled so. It has not met a GPU yet: only tests/test_benchmarks_gpu.py (tiny, on CPU) runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import haiku as hk
import jax
import optax

from rtdlm.metrics import device_memory, peak_flops, utilization
from rtdlm.model import build_with_stats, flops_per_token
from rtdlm.model.config import ATTENTION_IMPLS, COMPUTE_DTYPES, REMAT_POLICIES
from rtdlm.train import Batch, RunConfig
from rtdlm.train.loop import TrainState, init_state, make_optimizer
from rtdlm.train.sharding import checked_shape
from rtdlm.train.sharding import device_memory as planned_memory
from rtdlm_benchmarks.suite import BATCH, batches, lower_step, machine, run_config, table

GIB = 2**30
TARGET_MFU = 0.45  # against the H200's bf16 dense peak


def base_config(preset: str, dtype: str, attention: str, steps: int) -> RunConfig:
    """The suite's config for the preset, with this attention; remat and batch come later."""
    cfg = run_config(preset, dtype, steps)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attention))


def choice_config(base: RunConfig, remat: str, rows: int) -> RunConfig:
    """`base` with one remat policy and batch size (replace re-runs both configs' checks)."""
    model = dataclasses.replace(base.model, remat=remat)
    data = dataclasses.replace(base.data, batch_size=rows)
    return dataclasses.replace(base, model=model, data=data)


def planned_bytes(cfg: RunConfig) -> int:
    """The --dry-run total for one device. The planner counts every dense attention alike, so
    cuDNN's is planned as xla's: the same numbers, without tracing cuDNN (which needs a GPU)."""
    if cfg.model.attention != "blocked":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="xla"))
    return planned_memory(cfg, checked_shape(cfg, 1)).total


def plan_rows(base: RunConfig, remat: str, budget: int) -> int:
    """The largest batch whose plan fits `budget`. The plan is the state plus activations per
    row, linear in the batch, so the plans for 1 and 2 rows give it (checked at the answer)."""
    one, two = (planned_bytes(choice_config(base, remat, rows)) for rows in (1, 2))
    rows = (budget - (2 * one - two)) // (two - one)
    if rows < 1:
        raise ValueError(
            f"remat={remat}: one row is planned at {one / GIB:.2f} GiB, over the "
            f"{budget / GIB:.2f} GiB budget (--memory-gib x --fill)"
        )
    while rows > 1 and planned_bytes(choice_config(base, remat, rows)) > budget:
        rows -= 1
    return rows


def compiled_bytes(compiled: jax.stages.Compiled) -> int | None:
    """What the compiled step holds at once: arguments, outputs not aliased to the donated
    state, and XLA's temporaries; None where the backend gives no analysis."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return int(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )


def compile_ahead(
    cfg: RunConfig, model: hk.Transformed, optimizer: optax.GradientTransformation, batch: Batch
) -> tuple[jax.stages.Compiled, float]:
    """The trainer's step compiled for abstract state and batch, and the seconds that took:
    its size is known before any state is allocated, and no step runs inside the timing."""
    lowered, trace_s = lower_step(cfg, model, optimizer, batch)
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, trace_s + time.perf_counter() - start


def fit_and_compile(
    base: RunConfig, remat: str, rows: int, limit: int, fill: float
) -> tuple[RunConfig, jax.stages.Compiled, float, int | None]:
    """The compiled step at the planned batch, or, where the program itself is over `limit`,
    at a batch shrunk by the overshoot (twice at most): an out-of-memory run would end them
    all. Returns the config it fits, the program, its compile seconds and bytes."""
    message = ""
    for _ in range(3):
        cfg = choice_config(base, remat, rows)
        model, optimizer = build_with_stats(cfg.model), make_optimizer(cfg.optimizer)
        compiled, seconds = compile_ahead(cfg, model, optimizer, batches(cfg, 1)[0])
        used = compiled_bytes(compiled)
        if used is None or used <= limit:
            return cfg, compiled, seconds, used
        message = (
            f"remat={remat}: the compiled step needs {used / GIB:.2f} GiB at {rows} row(s), "
            f"over the {limit / GIB:.2f} GiB limit"
        )
        rows = min(rows - 1, int(rows * fill * limit / used))
        if rows < 1:
            break
    raise MemoryError(message)


def time_steps(
    cfg: RunConfig, compiled: jax.stages.Compiled, steps: int
) -> tuple[list[float], float]:
    """Seconds of each of `steps` steps after one untimed one, each waited for (batches are on
    the device beforehand), and the last loss: a number, so the step really ran."""
    model, optimizer = build_with_stats(cfg.model), make_optimizer(cfg.optimizer)
    state: TrainState = jax.jit(lambda: init_state(model, optimizer, cfg))()
    data = [jax.device_put(batch) for batch in batches(cfg, steps + 1)]
    state, metrics = compiled(state, data[0])
    jax.block_until_ready(metrics.loss)
    seconds = []
    for batch in data[1:]:
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics.loss)
        seconds.append(time.perf_counter() - start)
    return seconds, float(metrics.loss)


def device_peak_bytes() -> int | None:
    """The device's high-water mark of bytes in use in this process; None on CPU (none kept)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without statistics raise rather than return None
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else int(peak)


def memory_limit(memory_gib: float | None) -> tuple[int, str]:
    """Bytes one device may use, and where the number came from: --memory-gib, else the
    accelerator's bytes_limit (CPU reports none)."""
    if memory_gib is not None:
        return int(memory_gib * GIB), "--memory-gib"
    reading = device_memory(jax.devices()[0])
    if reading is None or reading[1] is None:
        raise SystemExit(
            f"{jax.devices()[0].device_kind} reports no memory limit: pass --memory-gib"
        )
    return int(reading[1]), "device bytes_limit"


def bench_choice(
    base: RunConfig, remat: str, limit: int, fill: float, steps: int
) -> dict[str, Any]:
    """One remat policy, planned, compiled, timed; MFU is added once the peak is known."""
    planned_rows = plan_rows(base, remat, int(limit * fill))
    cfg, compiled, compile_s, used = fit_and_compile(base, remat, planned_rows, limit, fill)
    seconds, loss = time_steps(cfg, compiled, steps)
    del compiled
    rows, seq_len = cfg.data.batch_size, cfg.model.seq_len
    p50 = statistics.median(seconds)
    device_peak = device_peak_bytes()
    return {
        "remat": remat,
        "batch": f"{rows} x {seq_len}",
        "tokens/s": rows * seq_len / p50,
        "model TFLOP/s": flops_per_token(cfg.model) * rows * seq_len / p50 / 1e12,
        "step p50 s": p50,
        "compile s": compile_s,
        "planned GiB": planned_bytes(cfg) / GIB,
        "compiled GiB": None if used is None else used / GIB,
        "device peak GiB": None if device_peak is None else device_peak / GIB,
        "loss": loss,
        "rows": rows,
        "planned rows": planned_rows,
        "step seconds": seconds,
    }


def report(results: dict[str, Any]) -> str:
    """The tables a person reads; the JSON keeps every field."""
    shown = ["remat", "batch", "tokens/s", "model TFLOP/s", "MFU", "step p50 s", "compile s"]
    shown += ["planned GiB", "compiled GiB", "device peak GiB"]
    rows = [{k: "-" if run[k] is None else run[k] for k in shown} for run in results["runs"]]
    s = results["settings"]
    lines = [table("machine", [results["machine"]])]
    title = (
        f"\n{s['preset']} in {s['dtype']}, attention={s['attention']}, {s['steps']} timed steps;"
        f" MFU against {results['peak']['TFLOP/s']:,.4g} TFLOP/s ({results['peak']['source']})"
    )
    lines += [table(title, rows)] if rows else [title, "no policy ran"]
    lines += [f"error, remat={e['remat']}: {e['error']}" for e in results["errors"]]
    best = results["best MFU"]
    if best is not None:
        verdict = "meets" if best >= TARGET_MFU else "misses"
        lines.append(f"best MFU {best:.3f} {verdict} the {TARGET_MFU} target")
    lines.append(f"wall {results['wall s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="medium", choices=list(BATCH))
    parser.add_argument("--dtype", default="bfloat16", choices=COMPUTE_DTYPES)
    parser.add_argument("--attention", default="cudnn", choices=ATTENTION_IMPLS)
    parser.add_argument("--remat", nargs="+", default=list(REMAT_POLICIES), choices=REMAT_POLICIES)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per remat policy")
    parser.add_argument(
        "--memory-gib", type=float, help="memory per device (default: the device's bytes_limit)"
    )
    parser.add_argument(
        "--fill", type=float, default=0.9, help="fraction of the memory the batch is planned to"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=300.0,
        help="start no further remat policy after this long (the run ends one policy later)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    base = base_config(args.preset, args.dtype, args.attention, args.steps)
    limit, limit_source = memory_limit(args.memory_gib)
    runs: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for remat in args.remat:
        if time.perf_counter() - start > args.max_seconds:
            errors.append({"remat": remat, "error": "not started: past --max-seconds"})
            continue
        try:
            runs.append(bench_choice(base, remat, limit, args.fill, args.steps))
        except Exception as error:  # one failed policy (cuDNN, memory) must not end the others
            traceback.print_exc()
            errors.append({"remat": remat, "error": f"{type(error).__name__}: {error}"[:2000]})
        print(f"remat={remat} done at {time.perf_counter() - start:.0f} s", flush=True)
    measured = peak_flops(dtype=args.dtype)  # the trainer's: the table's, or a measured dot
    for run in runs:
        run["MFU"] = utilization(run["model TFLOP/s"] * 1e12, 1.0, measured)[0]
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "preset": args.preset,
            "dtype": args.dtype,
            "attention": args.attention,
            "steps": args.steps,
            "seq_len": base.model.seq_len,
            "flops/token": flops_per_token(base.model),
            "memory limit GiB": limit / GIB,
            "memory limit from": limit_source,
            "fill": args.fill,
        },
        "peak": {"TFLOP/s": measured.flops_per_second / 1e12, "source": measured.source},
        "runs": runs,
        "errors": errors,
        "target MFU": TARGET_MFU,
        "best MFU": max((run["MFU"] for run in runs), default=None),
        "wall s": time.perf_counter() - start,
    }
    print(report(results), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    if not runs:
        raise SystemExit("no remat policy ran")


if __name__ == "__main__":
    main()
