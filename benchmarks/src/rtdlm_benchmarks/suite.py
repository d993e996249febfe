"""RT-DLM's benchmark suite: everything that decides training speed, measured in one run.

Run: ./pants run benchmarks -- [--out results.json] [--presets tiny small] [--steps 5]

Sections: matmul ceilings (float32, bf16 in / float32 out, bf16 in / bf16 out); training steps
of each preset in float32 and bfloat16 (tokens/s, step p50/p95, compile time), alternated
step by step with a PyTorch eager reference of the same model at matched precision and with
the step's own matrix products timed alone (its ceiling on this CPU; MFU is against it); a
second process compiling the same step against the first one's persistent compilation cache;
the data pipeline's batches/s over what training consumes; async checkpoint blocking as a
fraction of a step; verified checkpoint restore throughput over a raw read of the same bytes,
from the disk and from the page cache; decode tokens/s with the KV cache. Machine speed
drifts by up to 1.6x between runs, so compare ratios taken within one run, not absolute
numbers across runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from rtdlm.ckpt import CheckpointManager
from rtdlm.data.corpus import split_documents, stdlib_documents
from rtdlm.data.pipeline import Prefetch, packed_batches
from rtdlm.metrics import best_seconds, measure_matmul_flops
from rtdlm.model import build, build_with_stats, generate
from rtdlm.train import Batch, host, resolve
from rtdlm.train.config import RunConfig, for_first_start
from rtdlm.train.loop import TrainState, init_state, make_optimizer, make_train_step
from rtdlm.train.trainer import use_compile_cache
from rtdlm_benchmarks.versus import race

BATCH = {"tiny": (16, 256), "small": (4, 1024), "medium": (1, 2048), "large": (1, 2048)}
DTYPES = ("float32", "bfloat16")


def matmul_ceilings(rounds: int) -> dict[str, float]:
    """GFLOP/s of 2048 x 2048 dots, the three forms alternated round by round (medians)."""
    forms = {"float32": ("float32", "float32"), "bf16->f32": ("bfloat16", "float32")}
    forms["bf16->bf16"] = ("bfloat16", "bfloat16")
    seen: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(rounds):
        for name, (dtype, out) in forms.items():
            seen[name].append(measure_matmul_flops(2048, 3, dtype, out) / 1e9)
    return {name: statistics.median(values) for name, values in seen.items()}


def run_config(preset: str, dtype: str, steps: int) -> RunConfig:
    batch, seq = BATCH[preset]
    sets = [f"data.batch_size={batch}", f"model.seq_len={seq}", f"model.compute_dtype={dtype}"]
    sets += [f"train.max_steps={steps + 1}", "metrics.enabled=false"]
    return for_first_start(resolve(preset, sets=sets))


def batches(cfg: RunConfig, count: int) -> list[Batch]:
    stream = packed_batches(DATA.train, cfg.data.batch_size, cfg.model.seq_len, 0)
    return [Batch(tokens, segments) for tokens, segments, _ in itertools.islice(stream, count)]


def compile_step(cfg: RunConfig) -> tuple[Any, TrainState, float]:
    """The trainer's step, its state and the seconds its first call took (trace + compile)."""
    model = build_with_stats(cfg.model)
    optimizer = make_optimizer(cfg.optimizer)
    state = init_state(model, optimizer, cfg)
    step = make_train_step(model, optimizer, cfg)
    start = time.perf_counter()
    state, metrics = step(state, batches(cfg, 1)[0])
    jax.block_until_ready(metrics.loss)
    return step, state, time.perf_counter() - start


def training(
    presets: list[str], dtypes: list[str], steps: int, torch_python: str | None
) -> list[dict[str, Any]]:
    """Every (preset, dtype) compiled, then their steps alternated round-robin, each beside a
    PyTorch step of the same shapes and a pass over its own dots alone (rtdlm_benchmarks.versus)."""
    runs = []
    for preset, dtype in itertools.product(presets, dtypes):
        cfg = run_config(preset, dtype, steps)
        step, state, compile_s = compile_step(cfg)
        runs.append(
            {
                "cfg": cfg,
                "step": step,
                "state": state,
                "batches": batches(cfg, steps),
                "compile s": compile_s,
            }
        )
    rows = race(runs, steps, torch_python)
    for row, run in zip(rows, runs, strict=True):
        row["compile s"] = run["compile s"]
    return rows


def lower_step(
    cfg: RunConfig, model: hk.Transformed, optimizer: optax.GradientTransformation, batch: Batch
) -> tuple[jax.stages.Lowered, float]:
    """The trainer's step traced and lowered for abstract state and batch (nothing is
    allocated, so medium fits too), and the seconds that took."""
    state = jax.eval_shape(lambda: init_state(model, optimizer, cfg))
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
    step: Any = make_train_step(model, optimizer, cfg)
    start = time.perf_counter()
    lowered = step.lower(state, shapes)
    return lowered, time.perf_counter() - start


def _compile_in_fresh_process(preset: str, cache_dir: str) -> dict[str, float]:
    """Trace and compile seconds of the float32 step, with the persistent-cache hits JAX
    reports while compiling."""
    use_compile_cache(cache_dir)  # as the Trainer does
    events: list[str] = []
    jax.monitoring.register_event_listener(lambda event, **_: events.append(event))
    cfg = run_config(preset, "float32", 1)
    model, optimizer = build_with_stats(cfg.model), make_optimizer(cfg.optimizer)
    lowered, trace_s = lower_step(cfg, model, optimizer, batches(cfg, 1)[0])
    start = time.perf_counter()
    lowered.compile()
    return {
        "trace s": trace_s,
        "compile s": time.perf_counter() - start,
        "cache hits": events.count("/jax/compilation_cache/cache_hits"),
    }


def compile_cache(preset: str) -> dict[str, Any]:
    """Trace and compile seconds of the step in a new process with an empty persistent cache,
    then in another new process that finds the first one's cache (a restarted run): the
    second's compile is a cache hit, its trace is not cached."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as cache, context.Pool(1, maxtasksperchild=1) as pool:
        cold = pool.apply(_compile_in_fresh_process, (preset, cache))
        warm = pool.apply(_compile_in_fresh_process, (preset, cache))
    return {
        "preset": preset,
        "trace s": cold["trace s"],
        "compile s, first start": cold["compile s"],
        "compile s, restart": warm["compile s"],
        "cache hits, first / restart": f"{cold['cache hits']} / {warm['cache hits']}",
    }


def pipeline_headroom(preset: str, steps_per_second: float, seconds: float = 3.0) -> dict[str, Any]:
    """Batches/s the prefetched pipeline delivers alone, over the steps/s training takes."""
    cfg = run_config(preset, "float32", 1)
    stream = packed_batches(DATA.train, cfg.data.batch_size, cfg.model.seq_len, 0)
    source = Prefetch(stream, cfg.data.prefetch)
    next(source)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(source)
        count += 1
    source.close()
    rate = count / (time.perf_counter() - start)
    return {"preset": preset, "batches/s": rate, "headroom": rate / steps_per_second}


def _evict(directory: Path) -> None:
    """Drops the files' pages from the page cache, so the next read comes from the disk, as
    it does when a job restarts on a fresh node."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _raw_reads(arrays: list[np.ndarray], directory: Path) -> tuple[float, float]:
    """Seconds to read the arrays back from plain files: from the disk, then from the cache.

    All arrays are held until the last is read, as a restore holds them: reading each into
    memory freed by the one before would time copies into pages already mapped and warm.
    """
    directory.mkdir()
    for i, array in enumerate(arrays):
        with open(directory / f"{i}.bin", "wb") as f:
            f.write(array.tobytes())
    _evict(directory)
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        read = [np.fromfile(directory / f"{i}.bin", dtype=a.dtype) for i, a in enumerate(arrays)]
        seconds.append(time.perf_counter() - start)
        del read
    return seconds[0], seconds[1]


def _orbax_restore(step_dir: Path, state: TrainState) -> None:
    """The state's items read through orbax's own PyTree restore, unverified: the path that
    rtdlm.ckpt.arrays replaces."""
    handler = ocp.PyTreeCheckpointHandler(use_compression=False)
    for item, tree in (("params", state.params), ("opt_state", state.opt_state)):
        restore_args = ocp.checkpoint_utils.construct_restore_args(tree)
        args = ocp.args.PyTreeRestore(tree, restore_args=restore_args)
        jax.block_until_ready(handler.restore(step_dir / item, args=args))


def checkpoints(preset: str, step_seconds: float, rounds: int) -> dict[str, Any]:
    """For the preset's real train state: how long an async save holds the caller, over one
    step; verified restore throughput over plain reads of the same bytes, alternated, from
    the disk (a restart) and from the page cache; and orbax's own restore over rtdlm's direct
    reads, both unverified and from the page cache, alternated (the direct reader is kept
    only while it wins by 1.3x or more)."""
    cfg = run_config(preset, "float32", 1)
    model = build_with_stats(cfg.model)
    state = init_state(model, make_optimizer(cfg.optimizer), cfg)
    arrays = [np.asarray(a) for a in jax.tree.leaves((state.params, state.opt_state))]
    blocking, cold, warm, readers = [], [], [], []
    with (
        tempfile.TemporaryDirectory() as work,
        CheckpointManager(Path(work) / "checkpoints") as manager,
    ):
        for r in range(rounds):
            info = manager.save(r, params=state.params, opt_state=state.opt_state)
            blocking.append(info.blocking_seconds)
            manager.wait()
            _evict(Path(manager.directory / str(r)))
            restores = []
            for _ in range(2):
                start = time.perf_counter()
                manager.restore(r, params=state.params, opt_state=state.opt_state)
                restores.append(time.perf_counter() - start)
            raw_cold, raw_warm = _raw_reads(arrays, Path(work) / f"raw{r}")
            cold.append(raw_cold / restores[0])
            warm.append(raw_warm / restores[1])
            step_dir = Path(manager.directory / str(r))
            tree = {"params": state.params, "opt_state": state.opt_state}
            direct = best_seconds(partial(manager.restore, r, **tree, verify=False), repeats=2)
            orbax = best_seconds(_orbax_restore, step_dir, state, repeats=2)
            readers.append(orbax / direct)
    return {
        "preset": preset,
        "bytes": sum(a.nbytes for a in arrays),
        "save blocking / step": statistics.median(blocking) / step_seconds,
        "restore / raw read, disk": statistics.median(cold),
        "restore / raw read, cached": statistics.median(warm),
        "orbax restore / direct reads, cached": statistics.median(readers),
    }


def decoding(preset: str, new_tokens: int = 64, prompt_len: int = 64) -> dict[str, Any]:
    """Tokens/s of rtdlm.model.generate (KV cache, greedy), batch 1, after one warm-up."""
    cfg = run_config(preset, "float32", 1).model
    params = build(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    prompt = jnp.asarray(batches(run_config(preset, "float32", 1), 1)[0].tokens[:1, :prompt_len])
    run = lambda: generate(  # noqa: E731
        params,
        prompt,
        jax.random.PRNGKey(0),
        cfg=cfg,
        max_new_tokens=new_tokens,
        temperature=0.0,
    ).tokens
    seconds = best_seconds(run, repeats=2)
    return {"preset": preset, "tokens/s": new_tokens / seconds}


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    model = names[0] if names else platform.processor()
    flags = next((line.split() for line in lines if line.startswith("flags")), [])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "bf16 units": " ".join(f for f in ("amx_bf16", "avx512_bf16") if f in flags) or "none",
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def table(title: str, rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
        return str(value)

    keys = list(rows[0])
    widths = [max(len(k), *(len(cell(r[k])) for r in rows)) for k in keys]
    lines = [title, "  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=False))]
    lines += [
        "  ".join(cell(r[k]).rjust(w) for k, w in zip(keys, widths, strict=False)) for r in rows
    ]
    return "\n".join(lines)


DATA = split_documents(stdlib_documents())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=list(BATCH))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--rounds", type=int, default=3, help="matmul and checkpoint rounds")
    parser.add_argument(
        "--compile-presets",
        nargs="+",
        choices=list(BATCH),
        help="presets whose compile times and cache restart are measured (default: --presets "
        "and medium)",
    )
    parser.add_argument(
        "--torch-python",
        default=os.environ.get("RTDLM_HF_PYTHON"),
        help="a Python with torch for the PyTorch reference (default $RTDLM_HF_PYTHON; "
        "build-support/hf-venv.sh makes one); without it the comparison is left out",
    )
    args = parser.parse_args()
    host.restart_with_tunables()  # as the trainer does: step buffers reused, in huge pages
    results: dict[str, Any] = {"machine": machine()}
    print(table("machine", [results["machine"]]), flush=True)
    results["matmul GFLOP/s"] = matmul_ceilings(args.rounds)
    print(table("\nmatmul ceilings, GFLOP/s (2048 x 2048)", [results["matmul GFLOP/s"]]))
    results["training"] = training(args.presets, args.dtypes, args.steps, args.torch_python)
    title = (
        "\ntraining against PyTorch at matched precision and against the step's own dots alone"
        " (alternated step by step; MFU against those dots' FLOP/s)"
    )
    print(table(title, results["training"]))
    step_s = {r["preset"]: r["step p50 s"] for r in results["training"] if r["dtype"] == "float32"}
    step_s = step_s or {r["preset"]: r["step p50 s"] for r in results["training"]}
    compiled = args.compile_presets or list(dict.fromkeys([*args.presets, "medium"]))
    results["compile cache"] = [compile_cache(p) for p in compiled]
    print(table("\ncompile time and the persistent cache (float32 step)", results["compile cache"]))
    results["data pipeline"] = [pipeline_headroom(p, 1.0 / step_s[p]) for p in args.presets]
    print(
        table("\ndata pipeline (prefetched) over training's consumption", results["data pipeline"])
    )
    results["checkpoint"] = [checkpoints(p, step_s[p], args.rounds) for p in args.presets]
    print(table("\ncheckpoints (float32 state with AdamW moments)", results["checkpoint"]))
    results["decode"] = [decoding(p) for p in args.presets]
    print(table("\ndecode with the KV cache (batch 1, greedy)", results["decode"]))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
