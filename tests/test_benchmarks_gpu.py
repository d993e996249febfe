"""The GPU benchmark (benchmarks/gpu:gpu) end to end on CPU, with the tiny preset: it has not met a
GPU yet, so this keeps every step it takes there (plan, compile ahead, fit, time, MFU, JSON)
running."""

import json
import math
from pathlib import Path

import pytest
from rtdlm_benchmarks.gpu import main

pytestmark = pytest.mark.slow  # two compiles of the tiny step and a retry: about 40 s on 2 cores


def test_the_gpu_benchmark_runs_on_cpu_with_real_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gpu.json"
    limit_gib = 0.2
    args = ["--preset", "tiny", "--dtype", "float32", "--attention", "blocked", "--steps", "2"]
    args += ["--remat", "none", "full", "--memory-gib", str(limit_gib), "--fill", "0.75"]
    main([*args, "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["errors"] == []
    assert results["peak"]["source"].startswith("measured: best float32 ")  # no table peak
    assert results["peak"]["TFLOP/s"] > 0
    runs = {run["remat"]: run for run in results["runs"]}
    assert list(runs) == ["none", "full"]
    for run in runs.values():
        assert run["planned rows"] >= run["rows"] >= 1
        assert run["planned GiB"] <= 0.75 * limit_gib
        assert 0 < run["compiled GiB"] <= limit_gib  # shrunk to fit where the plan was short
        assert run["device peak GiB"] is None  # CPU keeps no statistics
        assert run["tokens/s"] > 0 and run["model TFLOP/s"] > 0
        assert 0 < run["MFU"] <= 1
        assert len(run["step seconds"]) == 2 and run["step p50 s"] > 0
        assert run["compile s"] > 0
        assert math.isfinite(run["loss"])
    # full remat keeps one tensor per block, so the planner fits more rows than without
    assert runs["full"]["planned rows"] > runs["none"]["planned rows"]
    assert results["best MFU"] == max(run["MFU"] for run in runs.values())
    printed = capsys.readouterr().out
    assert "MFU against" in printed and f"the {results['target MFU']} target" in printed
