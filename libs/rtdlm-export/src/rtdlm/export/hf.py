"""The Hugging Face export: a run's weights in `LlamaForCausalLM`'s layout (a mixture of
experts in `MixtralForCausalLM`'s) with its tokenizer, proven by transformers itself before
anything is written.

The directory holds config.json, model.safetensors (sharded above 5 GB, with its index),
generation_config.json, tokenizer.json and tokenizer_config.json, beside the artifact.json and
file manifest of every rtdlm artifact. The check loads it in a Python that has transformers and
torch (hf_check.py; the project's own environment has neither) and holds it to rtdlm.model:
logits within PARITY on held-out rows, a greedy continuation identical to
rtdlm.model.generate's, and the tokenizer's ids equal to ours on held-out text.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess  # nosec B404 # runs hf_check.py in the Python the user named
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rtdlm.data import Tokenizer
from rtdlm.data.hf import save_hf_tokenizer
from rtdlm.export import quality
from rtdlm.export.artifact import (
    CheckFailed,
    ExportError,
    Trained,
    check_output,
    describe,
    write_artifact,
)
from rtdlm.model import hf

KIND = "huggingface"
PARITY = 1e-4  # max abs logit difference, float32 compute on both sides
CHECK_ROWS = 2  # held-out rows whose logits are compared
CHECK_TIMEOUT_S = 1800
PYTHON_ENV = "RTDLM_HF_PYTHON"
SETUP_HINT = "build-support/hf-venv.sh makes one"


@dataclass(frozen=True)
class HfReport:
    max_abs_diff: float
    greedy: np.ndarray  # [1, n]: rtdlm.model.generate's and transformers' (they agree)
    text_tokens: int  # held-out tokens the two tokenizers encoded alike
    files: list[str]
    bytes: int
    versions: dict[str, str]
    checks: list[str]


def hf_python(python: str | None = None) -> str:
    """The Python that runs the check: `python`, else $RTDLM_HF_PYTHON, else this one if it has
    transformers and torch; ExportError saying how to get one otherwise."""
    chosen = python or os.environ.get(PYTHON_ENV)
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise ExportError(f"--hf-python {chosen} is not an executable Python ({SETUP_HINT})")
        return chosen
    if all(importlib.util.find_spec(name) for name in ("transformers", "torch")):
        return sys.executable
    raise ExportError(
        "exporter hf proves the export with transformers and torch, which this Python has not: "
        f"pass --hf-python PATH (or set {PYTHON_ENV}) to a Python that has them; {SETUP_HINT}"
    )


def run_check(
    python: str, directory: Path, request: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """hf_check.py on `directory`: its arrays and its info (versions, class, special ids)."""
    with tempfile.TemporaryDirectory(prefix="rtdlm-hf-check-") as scratch:
        request_file, result_file = Path(scratch) / "request.json", Path(scratch) / "result.npz"
        request_file.write_text(json.dumps(request))
        script = Path(__file__).with_name("hf_check.py")
        done = subprocess.run(  # nosec B603 # a fixed script and paths, no shell
            [python, str(script), str(directory), str(request_file), str(result_file)],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise CheckFailed(f"transformers could not load the export: {last}")
        with np.load(result_file) as result:
            arrays = {name: result[name] for name in result.files}
    return arrays, json.loads(str(arrays.pop("info")))


def reference_params(trained: Trained, dtype: str) -> Any:
    """Our parameters as the export stores them (rounded to `dtype`), back in our layout: what
    transformers is held to."""
    if dtype == "float32":
        return trained.params
    return hf.from_hf(hf.to_hf(trained.params, trained.cfg, dtype), trained.cfg)


def export_hf(
    trained: Trained,
    rows: np.ndarray,
    texts: list[str],
    out: Path,
    tokenizer: Tokenizer,
    python: str | None = None,
    dtype: str = "float32",
    force: bool = False,
) -> HfReport:
    """Writes `trained` at `out` in the Hugging Face layout once transformers, loading it,
    computes what rtdlm.model does on held-out `rows` [n, seq_len + 1] and encodes `texts` as
    `tokenizer` does; CheckFailed (nothing written) otherwise."""
    check_output(out, force)
    cfg = trained.cfg
    hf.check_exportable(cfg)
    python = hf_python(python)
    layout = hf.architecture(cfg)
    config = hf.hf_config(cfg, dtype, tokenizer.bos_id, tokenizer.eos_id)
    tensors = hf.to_hf(trained.params, cfg, dtype)
    params = reference_params(trained, dtype)
    rows = rows[:CHECK_ROWS, :-1]
    prompt_len = min(16, cfg.seq_len // 2)
    prompt, new_tokens = rows[:1, :prompt_len], min(64, cfg.seq_len - prompt_len)
    expected_logits = quality.jax_logits(cfg, params)(rows)
    expected_greedy = quality.jax_greedy(cfg, params, prompt, new_tokens)
    request = {
        "rows": rows.tolist(),
        "prompt": prompt.tolist(),
        "new_tokens": new_tokens,
        "texts": texts,
    }
    report: dict[str, Any] = {}

    def build(directory: Path) -> dict[str, Any]:
        files = hf.save(directory, tensors, config)
        files += save_hf_tokenizer(tokenizer, directory, cfg.seq_len)
        arrays, info = run_check(python, directory, request)
        report.update(
            check(
                arrays,
                info,
                expected_logits,
                expected_greedy,
                texts,
                tokenizer,
                layout,
            )
        )
        report["files"] = files
        report["bytes"] = sum((directory / f).stat().st_size for f in files)
        return describe(
            KIND,
            trained,
            tokenizer,
            huggingface={"architecture": layout, "dtype": dtype, "files": files},
            validation={
                "max_abs_diff": report["max_abs_diff"],
                "greedy_tokens": int(expected_greedy.size),
                "text_tokens": report["text_tokens"],
                "checks": report["checks"],
                "versions": report["versions"],
            },
        )

    write_artifact(out, build, tokenizer, force)
    return HfReport(
        report["max_abs_diff"],
        expected_greedy,
        report["text_tokens"],
        report["files"],
        report["bytes"],
        report["versions"],
        report["checks"],
    )


def check(
    arrays: dict[str, np.ndarray],
    info: dict[str, Any],
    expected_logits: np.ndarray,
    expected_greedy: np.ndarray,
    texts: list[str],
    tokenizer: Tokenizer,
    architecture: str,
) -> dict[str, Any]:
    """What transformers computed against what rtdlm does: the report's fields, or CheckFailed
    naming the first difference."""
    if info["model_class"] != architecture:
        raise CheckFailed(f"transformers loaded a {info['model_class']}, not {architecture}")
    diff = float(np.max(np.abs(arrays["logits"] - expected_logits)))
    if not diff <= PARITY:
        raise CheckFailed(
            f"transformers' logits differ from rtdlm.model's by up to {diff:.2e} (limit "
            f"{PARITY:.0e}); nothing was written"
        )
    greedy = arrays["greedy"]
    if greedy.shape != expected_greedy.shape or (greedy != expected_greedy).any():
        a, b = greedy.ravel(), expected_greedy.ravel()
        differ = np.flatnonzero(a[: b.size] != b[: a.size])
        agree = int(differ[0]) if differ.size else min(a.size, b.size)
        raise CheckFailed(
            f"transformers' greedy continuation leaves rtdlm.model.generate's after {agree} of "
            f"{expected_greedy.size} tokens; nothing was written"
        )
    ends = np.cumsum(arrays["text_lengths"])[:-1]
    for i, (text, ids) in enumerate(zip(texts, np.split(arrays["text_ids"], ends), strict=True)):
        ours = np.asarray(tokenizer.encode(text), np.int64)
        if ours.shape != ids.shape or (ours != ids).any():
            first = next(
                (k for k, (a, b) in enumerate(zip(ids, ours, strict=False)) if a != b), len(ours)
            )
            why = ""
            if tokenizer.index_entry.get("kind") == "sentencepiece":
                why = (
                    " (a SentencePiece unigram model breaks ties differently; see docs/interop.md)"
                )
            raise CheckFailed(
                f"AutoTokenizer encodes held-out text {i} to other ids than {tokenizer.name} from "
                f"token {first} on{why}; nothing was written"
            )
    if (info["bos_id"], info["eos_id"]) != (tokenizer.bos_id, tokenizer.eos_id):
        raise CheckFailed(
            f"AutoTokenizer's BOS/EOS ids are {info['bos_id']}/{info['eos_id']}, ours "
            f"{tokenizer.bos_id}/{tokenizer.eos_id}; nothing was written"
        )
    text_tokens = int(arrays["text_lengths"].sum())
    return {
        "max_abs_diff": diff,
        "text_tokens": text_tokens,
        "versions": {"transformers": info["transformers"], "torch": info["torch"]},
        "checks": [
            f"LlamaForCausalLM logits on {expected_logits.shape[0]} x {expected_logits.shape[1]} "
            f"held-out tokens within {PARITY:.0e} (max {diff:.1e})",
            f"generate: the same {expected_greedy.size} greedy tokens as rtdlm.model.generate",
            f"AutoTokenizer: the same ids for {len(texts)} held-out texts ({text_tokens:,} tokens)"
            " and the same BOS/EOS",
        ],
    }
