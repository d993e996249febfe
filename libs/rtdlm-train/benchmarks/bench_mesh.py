"""What a mesh costs: step time and collective bytes per layout, and 2 processes against 1.

Run: ./pants run libs/rtdlm-train/benchmarks:bench-mesh -- [--preset small] [--steps 2]
     ./pants run libs/rtdlm-train/benchmarks:bench-mesh -- --hosts [--steps 30]

Layouts run on 8 virtual CPU devices (this process sets XLA_FLAGS before JAX starts), taking
turns step by step so that machine drift hits them alike; collective bytes are read from the
compiled HLO (the result shapes of every all-reduce, all-gather, reduce-scatter, all-to-all and
collective-permute, per device and step). `--hosts` runs the Trainer as one process and as two
joined by jax.distributed on 127.0.0.1, alternately, and compares their tokens/s.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax
# ruff: noqa: E402

import argparse
import json
import re
import socket
import statistics
import subprocess  # nosec B404 # starts copies of this benchmark
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jax

from rtdlm.data.corpus import split_documents, stdlib_documents
from rtdlm.data.pipeline import packed_batches
from rtdlm.model import build_with_stats
from rtdlm.train import Trainer, distributed, resolve
from rtdlm.train.config import for_first_start
from rtdlm.train.loop import init_state, make_optimizer, make_train_step
from rtdlm.train.sharding import make_mesh, state_shardings
from rtdlm.train.trainer import global_batch

LAYOUTS = {
    "data=8": ["mesh.data=8"],
    "fsdp=8": ["mesh.data=1", "mesh.fsdp=8"],
    "data=2,tensor=4": ["mesh.data=2", "mesh.tensor=4"],
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
SHAPE = re.compile(r"\b(f32|bf16|s32|u32|f16|pred|s8|u8)\[([0-9,]*)\]")


def collective_bytes(hlo: str) -> Counter[str]:
    """Bytes each kind of collective produces per device, from an HLO module's text."""
    totals: Counter[str] = Counter()
    for line in hlo.splitlines():
        for kind in COLLECTIVES:
            match = re.search(rf"=\s*(.*?)\s{kind}(-start)?\(", line)
            if match:
                for dtype, dims in SHAPE.findall(match.group(1)):
                    size = 1
                    for dim in filter(None, dims.split(",")):
                        size *= int(dim)
                    totals[kind] += size * DTYPE_BYTES[dtype]
    return totals


def layouts(preset: str, steps: int, sets: list[str]) -> None:
    data = split_documents(stdlib_documents())
    runs: dict[str, dict[str, Any]] = {}
    for name, mesh_sets in LAYOUTS.items():
        cfg = for_first_start(resolve(preset, sets=[*sets, *mesh_sets], vocab_size=256))
        mesh = make_mesh(cfg)
        model, optimizer = build_with_stats(cfg.model), make_optimizer(cfg.optimizer)
        shapes = jax.eval_shape(lambda: init_state(model, optimizer, cfg))  # noqa: B023
        init = jax.jit(
            lambda: init_state(model, optimizer, cfg),  # noqa: B023
            out_shardings=state_shardings(mesh, optimizer, shapes),
        )
        step: Any = make_train_step(model, optimizer, cfg, mesh)  # jitted: has .lower
        rows = packed_batches(data.train, cfg.data.batch_size, cfg.model.seq_len, 0)
        batches = [global_batch(mesh, t, s) for t, s, _ in (next(rows) for _ in range(steps + 1))]
        state = init()
        started = time.perf_counter()
        hlo = step.lower(state, batches[0]).compile().as_text()
        state, metrics = step(state, batches[0])
        jax.block_until_ready(metrics)
        runs[name] = {
            "cfg": cfg,
            "step": step,
            "state": state,
            "batches": batches[1:],
            "compile": time.perf_counter() - started,
            "bytes": collective_bytes(hlo),
            "seconds": [],
        }
    for index in range(steps):  # A, B, C, A, B, C, ...
        for run in runs.values():
            begin = time.perf_counter()
            run["state"], metrics = run["step"](run["state"], run["batches"][index])
            jax.block_until_ready(metrics)
            run["seconds"].append(time.perf_counter() - begin)
    cfg = next(iter(runs.values()))["cfg"]
    tokens = cfg.data.batch_size * cfg.model.seq_len
    print(f"{preset}, batch {cfg.data.batch_size} x {cfg.model.seq_len}, 8 virtual CPU devices")
    print(f"{'layout':18s} {'compile s':>9s} {'step s':>8s} {'tokens/s':>9s}  collective MB/step")
    for name, run in runs.items():
        seconds = statistics.median(run["seconds"])
        detail = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in sorted(run["bytes"].items())) or "-"
        print(
            f"{name:18s} {run['compile']:9.1f} {seconds:8.2f} {tokens / seconds:9,.0f}  "
            f"{sum(run['bytes'].values()) / 1e6:.1f} ({detail})",
            flush=True,
        )


def worker(processes: int, index: int, port: int, run_dir: str, steps: int) -> None:
    """One process of the --hosts comparison: the Trainer, joined to the others if any."""
    cluster = distributed.Cluster(f"127.0.0.1:{port}", processes, index)
    distributed.initialize(cluster)
    sets = ["data.batch_size=8", f"train.max_steps={steps + 2}", "metrics.enabled=false"]
    sets += ["train.eval_every=100000", "train.checkpoint_every=100000"]
    cfg = resolve("tiny", sets=sets, vocab_size=256)
    Trainer(cfg, split_documents(stdlib_documents()), run_dir, compile_cache=False).run()


def tokens_per_second(run_dir: Path, steps: int, processes: int) -> float:
    """Median tokens/s of a tiny run (after two warm-up steps), as 1 or 2 processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.pathsep.join(sys.path)  # inside a PEX too, the workers import what we import
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    command = [sys.executable, sys.argv[0], "--worker", str(processes)]
    running = [
        subprocess.Popen(  # nosec B603 # this script, no shell
            [*command, str(i), str(port), str(run_dir), str(steps)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(processes)
    ]
    if not all(p.wait() == 0 for p in running):
        raise RuntimeError("a --hosts worker failed: rerun it alone to see why")
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    return statistics.median(json.loads(line)["tokens_per_second"] for line in lines[2:])


def hosts(steps: int, rounds: int) -> None:
    results: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as root:
        for round_ in range(rounds):
            for processes in (1, 2):
                run_dir = Path(root) / f"{processes}-{round_}"
                results[processes].append(tokens_per_second(run_dir, steps, processes))
    one, two = (statistics.median(results[p]) for p in (1, 2))
    print(f"tiny, global batch 8 x 256, the Trainer, {rounds} alternating rounds of {steps} steps")
    print(f"1 process:   {one:8,.0f} tokens/s  {[round(x) for x in results[1]]}")
    print(
        f"2 processes: {two:8,.0f} tokens/s  {[round(x) for x in results[2]]}  ({two / one:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per layout")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE")
    parser.add_argument("--hosts", action="store_true", help="2 processes against 1 instead")
    parser.add_argument("--rounds", type=int, default=2, help="--hosts: alternating rounds")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        processes, index, port, run_dir, steps = args.worker
        worker(int(processes), int(index), int(port), run_dir, int(steps))
        return
    if args.hosts:
        hosts(args.steps, args.rounds)
        return
    sets = args.sets or ["model.seq_len=256", "data.batch_size=8"]
    layouts(args.preset, args.steps, [*sets, "metrics.enabled=false"])


if __name__ == "__main__":
    main()
