"""RT-DLM's training step against the PyTorch reference (torch_reference.py) and against its
own ceiling (ceiling.py), alternated step by step in one run.

The reference runs in a worker process under a Python with torch (--torch-python, else
$RTDLM_HF_PYTHON: build-support/hf-venv.sh makes one); the two never run at once, so each has
the whole machine for its step. Both train the same bytes at the same shapes and precision:
float32 against float32, RT-DLM's bfloat16 compute against PyTorch's autocast to bfloat16.
"""

from __future__ import annotations

import json
import statistics
import subprocess  # nosec B404 # the PyTorch reference is our own script
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rtdlm.model import flops_per_token
from rtdlm.train.config import RunConfig
from rtdlm_benchmarks.ceiling import Ceiling

REFERENCE = Path(__file__).with_name("torch_reference.py")
SPEEDUP = 1.5  # the goal over PyTorch at matched precision
OF_CEILING = 0.8  # the goal where the ceiling itself is short of SPEEDUP


class Reference:
    """A PyTorch worker holding one model, its optimizer and one batch."""

    def __init__(self, python: str, cfg: RunConfig, tokens: np.ndarray, work: Path) -> None:
        path = work / f"tokens-{cfg.preset}-{cfg.model.compute_dtype}.npy"
        np.save(path, tokens)
        m, o = cfg.model, cfg.optimizer
        build = {
            "d_model": m.d_model,
            "num_layers": m.num_layers,
            "num_heads": m.num_heads,
            "num_kv_heads": m.num_kv_heads,
            "seq_len": m.seq_len,
            "vocab_size": m.vocab_size,
            "d_ff": m.ffn_dim,
            "rope_base": m.rope_base,
            "norm_eps": m.norm_eps,
            "dtype": m.compute_dtype,
            "learning_rate": o.learning_rate,
            "b1": o.b1,
            "b2": o.b2,
            "eps": o.eps,
            "weight_decay": o.weight_decay,
            "clip_norm": o.clip_norm,
            "warmup_steps": o.warmup_steps,
            "decay_steps": o.decay_steps,
            "min_lr_ratio": o.min_lr_ratio,
            "tokens": str(path),
        }
        self.process = subprocess.Popen(  # nosec B603 # our script, our interpreter
            [python, str(REFERENCE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self.ask({"build": build})

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin and self.process.stdout  # nosec B101 # opened as pipes
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch reference exited ({self.process.wait()})")
        return dict(json.loads(line))

    def step(self) -> float:
        return float(self.ask({"steps": 1})["seconds"][0])

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def verdict(ratio: float, of_ceiling: float, ceiling_s: float, reference_s: float) -> str:
    """Whether the step meets its goal: SPEEDUP over PyTorch, or, where its own dots alone
    take longer than SPEEDUP would allow (ceiling_s > reference_s / SPEEDUP), OF_CEILING of
    that ceiling."""
    if ratio >= SPEEDUP:
        return f"met: {ratio:.2f}x PyTorch"
    if ceiling_s > reference_s / SPEEDUP:
        met = "met" if of_ceiling >= OF_CEILING else "not met"
        return (
            f"{met}: {SPEEDUP}x needs {reference_s / SPEEDUP:.3f} s, dots alone take "
            f"{ceiling_s:.3f} s; step at {of_ceiling:.2f} of them (goal {OF_CEILING})"
        )
    return f"not met: {ratio:.2f}x PyTorch (goal {SPEEDUP}x)"


def race(runs: list[dict[str, Any]], steps: int, torch_python: str | None) -> list[dict[str, Any]]:
    """Each run ({"cfg", "step", "state", "batches"} as the suite compiles them) stepped
    `steps` times, each of its steps followed by a PyTorch step of the same shapes and a pass
    over its dots alone, the runs taken round-robin."""
    with tempfile.TemporaryDirectory() as work:
        for run in runs:
            tokens = np.asarray(run["batches"][0].tokens)
            run["reference"] = (
                Reference(torch_python, run["cfg"], tokens, Path(work)) if torch_python else None
            )
            run["ceiling"] = Ceiling(run["step"], run["state"], run["batches"][0])
            run["ceiling"].sample()
            run.update(seconds=[], reference_seconds=[])
            if run["reference"]:
                run["reference"].step()  # PyTorch's first step allocates; not timed
        for i in range(steps):
            for run in runs:
                start = time.perf_counter()
                run["state"], metrics = run["step"](run["state"], run["batches"][i])
                jax.block_until_ready(metrics.loss)
                run["seconds"].append(time.perf_counter() - start)
                if run["reference"]:
                    run["reference_seconds"].append(run["reference"].step())
                run["ceiling"].sample()
        for run in runs:
            if run["reference"]:
                run["reference"].close()
    return [_row(run) for run in runs]


def _row(run: dict[str, Any]) -> dict[str, Any]:
    cfg, ceiling = run["cfg"], run["ceiling"]
    tokens = cfg.data.batch_size * cfg.model.seq_len
    p50 = statistics.median(run["seconds"])
    model_flops = flops_per_token(cfg.model) * tokens
    row: dict[str, Any] = {
        "preset": cfg.preset,
        "dtype": cfg.model.compute_dtype,
        "batch": f"{cfg.data.batch_size} x {cfg.model.seq_len}",
        "tokens/s": tokens / p50,
        "step p50 s": p50,
        "step p95 s": float(np.percentile(run["seconds"], 95)),
        "dots alone s": ceiling.seconds,
        "of ceiling": ceiling.seconds / p50,
        # model FLOP/s over the FLOP/s its own dots reach alone: MFU against the ceiling
        "MFU": (model_flops / p50) / (ceiling.flops / ceiling.seconds),
    }
    if run["reference_seconds"]:
        reference = statistics.median(run["reference_seconds"])
        pairs = zip(run["reference_seconds"], run["seconds"], strict=True)
        ratio = statistics.median(theirs / ours for theirs, ours in pairs)
        row |= {
            "PyTorch tokens/s": tokens / reference,
            "vs PyTorch": ratio,
            "goal": verdict(ratio, ceiling.seconds / p50, ceiling.seconds, reference),
        }
    return row
