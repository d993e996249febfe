"""Inference speed and size of the four ways to run an exported model: JAX float32, JAX INT8,
ONNX Runtime float32 and ONNX Runtime INT8.

Run: ./pants run libs/rtdlm-export/benchmarks:bench -- [--preset tiny] [--checkpoint RUN_DIR]

Each runtime is driven as its generate path runs: one prefill of the prompt, then one decode step
per token with the KV cache (JAX: rtdlm.model.generate's loop on the device; ONNX Runtime: one
session call per token from the host). Machine speed drifts, so the runtimes are
timed in alternation within each round (their order rotating), and the numbers to compare are
the per-round ratios to JAX float32, as medians. Weights are the checkpoint's if given (the
newest intact step), else the preset's initialisation: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from rtdlm.export.artifact import inference_config, load_checkpoint
from rtdlm.export.int8 import WEIGHTS, flatten
from rtdlm.export.onnx_export import DATA, quantize_graphs, save_graphs
from rtdlm.export.onnx_graph import decoder_graph
from rtdlm.export.onnx_runtime import GRAPHS, OnnxModel
from rtdlm.export.quantize import Params, nbytes, quantize
from rtdlm.model import ModelConfig, build, build_decoder, generate, init_cache, preset

Measure = Callable[[np.ndarray, int], tuple[float, float]]  # prompt, n -> prefill s, s/token


def jax_runtime(cfg: ModelConfig, params: Params) -> Measure:
    """rtdlm.model as `exporter generate` runs it: a compiled prefill, and generate's decode
    loop on the device, its per-token time the difference of n and 1 new tokens over n - 1."""
    decoder = jax.jit(build_decoder(cfg).apply)

    def run(prompt: jax.Array, n: int) -> float:
        start = time.perf_counter()
        out = generate(
            params, prompt, jax.random.PRNGKey(0), cfg=cfg, max_new_tokens=n, temperature=0.0
        )
        jax.block_until_ready(out.tokens)
        return time.perf_counter() - start

    def measure(prompt: np.ndarray, n: int) -> tuple[float, float]:
        tokens = jnp.asarray(prompt, jnp.int32)
        cache = init_cache(cfg, prompt.shape[0], prompt.shape[1])
        start = time.perf_counter()
        jax.block_until_ready(decoder(params, None, tokens, cache))
        prefill = time.perf_counter() - start
        return prefill, (run(tokens, n) - run(tokens, 1)) / (n - 1)

    return measure


def onnx_runtime(model: OnnxModel) -> Measure:
    """ONNX Runtime as OnnxModel.generate runs it: prefill, then one decode step per token."""

    def measure(prompt: np.ndarray, n: int) -> tuple[float, float]:
        start = time.perf_counter()
        logits, cache = model.prefill(prompt)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(n):
            token = logits[:, -1].argmax(axis=-1)[:, None]
            logits, cache = model.step(token, cache)
        return prefill, (time.perf_counter() - start) / n

    return measure


def directory_bytes(directory: Path, names: list[str]) -> int:
    return sum((directory / name).stat().st_size for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--checkpoint", type=Path, help="a run dir or its checkpoints/")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()

    if args.checkpoint is not None:
        trained = load_checkpoint(args.checkpoint)
        cfg, params = trained.cfg, trained.params
    else:
        cfg = inference_config(preset(args.preset))
        init = build(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
        params = jax.tree_util.tree_map(np.asarray, init)
    if args.prompt_tokens + args.new_tokens > cfg.seq_len or args.new_tokens < 2:
        parser.error(f"need 2 <= --new-tokens and prompt + new tokens <= seq_len {cfg.seq_len}")
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt_tokens))

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        int8_params = quantize(params)
        save_file(flatten(int8_params), str(root / WEIGHTS))
        (root / "onnx").mkdir()
        (root / "onnx-int8").mkdir()
        graphs = {
            GRAPHS["prefill"]: decoder_graph(cfg, params, past=False),
            GRAPHS["decode"]: decoder_graph(cfg, params, past=True),
        }
        save_graphs(graphs, root / "onnx")
        quantize_graphs(root / "onnx", root / "onnx-int8")
        onnx_files = [*GRAPHS.values(), DATA]
        sizes = {
            "JAX float32": nbytes(params),
            "JAX INT8": (root / WEIGHTS).stat().st_size,
            "ONNX Runtime float32": directory_bytes(root / "onnx", onnx_files),
            "ONNX Runtime INT8": directory_bytes(root / "onnx-int8", onnx_files),
        }
        runtimes = {
            "JAX float32": jax_runtime(cfg, params),
            "JAX INT8": jax_runtime(cfg, int8_params),
            "ONNX Runtime float32": onnx_runtime(OnnxModel(root / "onnx", cfg)),
            "ONNX Runtime INT8": onnx_runtime(OnnxModel(root / "onnx-int8", cfg)),
        }
        names = list(runtimes)
        for name in names:  # compile and warm up
            runtimes[name](prompt, args.new_tokens)
        rounds: list[dict[str, tuple[float, float]]] = []
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            rounds.append({name: runtimes[name](prompt, args.new_tokens) for name in order})

    base = "JAX float32"
    prefill_tokens = args.batch * args.prompt_tokens
    results = {}
    for name in names:
        prefill = statistics.median(prefill_tokens / r[name][0] for r in rounds)
        decode_ms = statistics.median(r[name][1] * 1e3 for r in rounds)
        results[name] = {
            "prefill_tokens_per_second": prefill,
            "decode_ms_per_token": decode_ms,
            "prefill_speed_vs_jax_float32": statistics.median(
                r[base][0] / r[name][0] for r in rounds
            ),
            "decode_speed_vs_jax_float32": statistics.median(
                r[base][1] / r[name][1] for r in rounds
            ),
            "bytes": sizes[name],
        }
    print(
        f"{cfg.num_layers} layers x {cfg.d_model}, batch {args.batch}, prompt "
        f"{args.prompt_tokens}, {args.new_tokens} new tokens greedy, {args.rounds} alternated "
        "rounds (medians; speed ratios to JAX float32 taken within each round, higher is faster)"
    )
    header = ("runtime", "prefill tok/s", "ratio", "decode ms/tok", "ratio", "bytes")
    print("{:22} {:>14} {:>6} {:>14} {:>6} {:>13}".format(*header))
    for name, row in results.items():
        print(
            f"{name:22} {row['prefill_tokens_per_second']:14,.0f} "
            f"{row['prefill_speed_vs_jax_float32']:6.2f} {row['decode_ms_per_token']:14.3f} "
            f"{row['decode_speed_vs_jax_float32']:6.2f} {row['bytes']:13,}"
        )
    if args.out is not None:
        setup = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"setup": setup, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
