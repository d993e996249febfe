"""The suite's race against PyTorch (rtdlm_benchmarks.versus): the reference is the same model
as RT-DLM's, it trains, and the race reports both sides and the step's ceiling. Timings are
the benchmark's business; this checks that what it times is what it says."""

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import venv_tool
from rtdlm_benchmarks.ceiling import Ceiling
from rtdlm_benchmarks.suite import batches, compile_step
from rtdlm_benchmarks.versus import Reference, race, verdict

from rtdlm.model import flops_per_token, param_count
from rtdlm.train import resolve
from rtdlm.train.config import RunConfig, for_first_start

pytestmark = pytest.mark.slow  # two PyTorch processes and two compiles: about 40 s on 2 cores

SHAPE = ("data.batch_size=2", "model.seq_len=64", "train.max_steps=4", "metrics.enabled=false")


def torch_python() -> str:
    return venv_tool("RTDLM_HF_PYTHON", "Python with torch", "hf-venv.sh", "RTDLM_REQUIRE_HF")


def config(dtype: str) -> RunConfig:
    return for_first_start(resolve("tiny", sets=[*SHAPE, f"model.compute_dtype={dtype}"]))


def test_the_reference_is_rtdlms_model_and_it_trains(tmp_path: Path) -> None:
    cfg = config("float32")
    tokens = np.asarray(batches(cfg, 1)[0].tokens)
    reference = Reference(torch_python(), cfg, tokens, tmp_path)
    try:
        assert reference.info["params"] == param_count(cfg.model)  # same shapes, tied embeddings
        losses = [reference.ask({"steps": 1})["loss"] for _ in range(4)]
    finally:
        reference.close()
    assert abs(losses[0] - math.log(cfg.model.vocab_size)) < 0.1  # small initial logits
    assert losses[-1] < losses[0]  # the same batch again: AdamW must bring its loss down


def test_the_race_reports_pytorch_and_the_ceiling() -> None:
    runs = []
    for dtype in ("float32", "bfloat16"):
        cfg = config(dtype)
        step, state, _ = compile_step(cfg)
        runs.append({"cfg": cfg, "step": step, "state": state, "batches": batches(cfg, 2)})
    rows = race(runs, 2, torch_python())
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    for row in rows:
        assert row["tokens/s"] > 0 and row["PyTorch tokens/s"] > 0 and row["vs PyTorch"] > 0
        assert row["dots alone s"] > 0 and row["of ceiling"] > 0 and row["MFU"] > 0
        assert row["goal"].startswith(("met", "not met"))


def test_the_ceiling_finds_every_dot_of_the_step_forward_and_backward() -> None:
    cfg = config("bfloat16")
    step, state, _ = compile_step(cfg)
    ceiling = Ceiling(step, state, batches(cfg, 1)[0])
    tokens = cfg.data.batch_size * cfg.model.seq_len
    # The model's FLOPs count causal attention at half of T x T; the step computes its one
    # 64-row block whole and recomputes the scores in the backward pass, so its dots hold more.
    model_flops = flops_per_token(cfg.model) * tokens
    assert model_flops < ceiling.flops < 1.1 * model_flops
    assert {str(dot.lhs.dtype) for dot, *_ in ceiling.entries} == {"bfloat16", "float32"}
    ceiling.sample(repeats=1)
    assert 0 < ceiling.seconds < math.inf


def test_the_goal_falls_back_to_the_ceiling_only_where_the_ceiling_is_short_of_it() -> None:
    assert verdict(1.6, 0.5, 1.0, 2.0).startswith("met: 1.60x")
    assert verdict(1.2, 0.85, 1.5, 2.0).startswith("met: 1.5x needs 1.333 s")
    assert verdict(1.2, 0.75, 1.5, 2.0).startswith("not met: 1.5x needs")
    assert verdict(1.2, 0.95, 1.0, 2.0) == "not met: 1.20x PyTorch (goal 1.5x)"
