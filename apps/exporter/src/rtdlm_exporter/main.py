"""`exporter`: turn a training checkpoint into checked inference artifacts, and run them.

The app edge: arguments, the held-out data and tokenizer (rtdlm.data), and the terminal. The
artifacts and their checks are rtdlm.export's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from rtdlm.ckpt import CheckpointError, download, is_remote, local_path, storage_path
from rtdlm.data import DataError, Tokenizer, from_index, load_data, load_held_out
from rtdlm.export import hf as hf_export
from rtdlm.export import int8, onnx_export, quality
from rtdlm.export.artifact import (
    CheckFailed,
    ExportError,
    Trained,
    check_output,
    load_checkpoint,
)
from rtdlm.export.onnx_runtime import OnnxModel, check_context
from rtdlm.model import generate, hf

BAD_INPUT = (ExportError, CheckpointError, DataError, hf.HfError)
HF_CHECK_TEXTS = 8  # held-out rows, decoded, that both tokenizers must encode alike


def step_arg(text: str) -> int | str:
    if text == "best":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step number or 'best'") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="exporter",
        description="Export a trained RT-DLM checkpoint as a checked INT8, ONNX or Hugging Face "
        "artifact, verify one, or generate text with one.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quantize = commands.add_parser("quantize", help="weight-only INT8 artifact that JAX runs")
    onnx = commands.add_parser("onnx", help="ONNX prefill and decode graphs with a KV cache")
    verify = commands.add_parser("verify", help="run an ONNX artifact's checks again")
    hf_layout = commands.add_parser(
        "hf", help="Hugging Face LlamaForCausalLM directory, checked with transformers"
    )
    for command in (quantize, onnx, verify, hf_layout):
        command.add_argument(
            "--checkpoint",
            type=storage_path,
            required=True,
            help="a run (dir): a folder, s3://bucket/prefix or gs://bucket/prefix",
        )
        command.add_argument("--step", type=step_arg, help="step or 'best' (default: newest)")
        command.add_argument("--data", type=local_path, help="held-out data (default: the run's)")
        command.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens")
        command.add_argument(
            "--max-ppl-increase",
            type=float,
            default=2.0,
            metavar="PERCENT",
            help="fail when held-out perplexity rises more than this over float32 (default 2)",
        )
    for command in (quantize, onnx, hf_layout):
        command.add_argument("--out", type=local_path, required=True, help="artifact directory")
        command.add_argument("--force", action="store_true", help="replace an existing --out")
    onnx.add_argument("--int8", action="store_true", help="INT8 MatMul weights (ONNX Runtime)")
    verify.add_argument(
        "--onnx", type=local_path, required=True, help="the ONNX artifact directory"
    )
    hf_layout.add_argument("--dtype", choices=sorted(hf.DTYPES), default="float32")
    hf_layout.add_argument(
        "--hf-python",
        help=f"a Python with transformers and torch for the check (default: ${hf_export.PYTHON_ENV}"
        ", else this one)",
    )
    run = commands.add_parser("generate", help="continue a prompt with an exported artifact")
    run.add_argument("--model", type=local_path, required=True, help="an INT8 or ONNX artifact dir")
    run.add_argument("--prompt", required=True)
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    run.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    run.add_argument(
        "--top-p", type=float, default=1.0, help="sample within the top p of probability mass"
    )
    run.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def held_out(trained: Trained, data: Path | None, eval_tokens: int) -> tuple[np.ndarray, Tokenizer]:
    """Held-out rows to measure on, and their tokenizer: `data` where given, else the run's own
    copy of its first held-out documents and tokenizer (`<run>/data/`), else (a run from before
    runs kept one) the data directory it trained on."""
    run_copy = storage_path(trained.source["checkpoint"]).parent / "data"
    if data is None and (run_copy / "index.json").is_file():
        if is_remote(run_copy):  # a few small files: read from a local copy
            run_copy = download(run_copy, tempfile.mkdtemp(prefix="rtdlm-held-out-"))
        validation, tokenizer = load_held_out(Path(run_copy))
    else:
        where = data or (trained.run_config.get("data") or {}).get("path")
        path = None if where is None else Path(where)
        if path is not None and not path.is_dir():
            raise ExportError(f"the run's data directory {path} is gone: pass --data DIR")
        splits, tokenizer = load_data(path)
        validation = splits.validation
    if tokenizer.vocab_size > trained.cfg.vocab_size:
        raise ExportError(
            f"the data's tokenizer has {tokenizer.vocab_size:,} tokens, more than the model's "
            f"vocabulary of {trained.cfg.vocab_size:,}: pass the --data it was trained on"
        )
    documents = (validation.document(i) for i in range(validation.num_documents))
    rows = quality.windows(documents, trained.cfg.seq_len, eval_tokens)
    return rows, tokenizer


def text(tokenizer: Tokenizer, tokens: np.ndarray) -> str:
    return repr(tokenizer.decode(np.asarray(tokens).ravel()))


def export(args: argparse.Namespace) -> None:
    if args.command != "verify":
        check_output(args.out, args.force)  # before minutes of work
    trained = load_checkpoint(args.checkpoint, args.step)
    rows, tokenizer = held_out(trained, args.data, args.eval_tokens)
    limit, step = args.max_ppl_increase / 100, trained.source["step"]
    if args.command == "quantize":
        q = int8.quantize_checkpoint(trained, rows, args.out, tokenizer, limit, args.force)
        c = q.vs_float32
        print(
            f"quantized step {step}: {q.float32_bytes:,} -> {q.int8_bytes:,} bytes "
            f"({q.float32_bytes / q.int8_bytes:.2f}x smaller)\n"
            f"held-out perplexity ({c.measured.tokens:,} tokens): float32 "
            f"{c.reference.perplexity:.4f} | int8 {c.measured.perplexity:.4f} ({c.increase:+.2%}, "
            f"limit {limit:.2%})\ngreedy, float32: {text(tokenizer, c.greedy_reference)}\n"
            f"greedy, int8:    {text(tokenizer, c.greedy_measured)} ({c.greedy_agreement} of "
            f"{c.greedy_reference.size} tokens agree)\nwritten to {args.out}"
        )
        return
    if args.command == "hf":
        texts = [tokenizer.decode(row) for row in rows[:HF_CHECK_TEXTS]]
        r = hf_export.export_hf(
            trained, rows, texts, args.out, tokenizer, args.hf_python, args.dtype, args.force
        )
        layout = hf.architecture(trained.cfg)
        print(
            f"Hugging Face {layout}, {args.dtype}, step {step}: {r.bytes:,} bytes in "
            f"{', '.join(r.files)}\nchecked with transformers {r.versions['transformers']} "
            f"(torch {r.versions['torch']}): " + "; ".join(r.checks) + "\n"
            f"greedy: {text(tokenizer, r.greedy)}\nwritten to {args.out}"
        )
        return
    if args.command == "onnx":
        report = onnx_export.export_onnx(
            trained,
            rows,
            args.out,
            tokenizer,
            int8=args.int8,
            max_increase=limit,
            force=args.force,
        )
        where = f"written to {args.out}"
    else:
        report = onnx_export.verify_onnx(args.onnx, trained, rows, limit)
        where = f"{args.onnx} verified against step {step}"
    kind, c = "INT8" if report.int8 else "float32", report.vs_float32
    lines = [f"ONNX {kind}, opset {onnx_export.OPSET}, step {step}: {report.bytes:,} bytes"]
    if report.max_abs_diff:
        diffs = ", ".join(f"{k.replace('_', ' ')} {v:.1e}" for k, v in report.max_abs_diff.items())
        lines.append(f"max abs difference to JAX: {diffs} (limit {onnx_export.PARITY:.0e})")
    lines += [
        f"greedy: {c.greedy_agreement} of {c.greedy_reference.size} tokens as "
        f"rtdlm.model.generate: {text(tokenizer, c.greedy_measured)}",
        f"held-out perplexity ({c.measured.tokens:,} tokens): JAX float32 "
        f"{c.reference.perplexity:.4f} | ONNX {kind} {c.measured.perplexity:.4f} "
        f"({c.increase:+.2%}, limit {limit:.2%})",
        "checks passed: " + "; ".join(report.checks),
        where,
    ]
    print("\n".join(lines))


def run(args: argparse.Namespace) -> None:
    """Generates from an artifact with the tokenizer it carries."""
    if (args.model / onnx_export.GRAPHS["prefill"]).exists():
        model, manifest = OnnxModel.open(args.model)
        cfg = model.cfg

        def continuation(prompt: np.ndarray) -> np.ndarray:
            return model.generate(
                prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed
            )

    else:
        cfg, params, manifest = int8.load(args.model)

        def continuation(prompt: np.ndarray) -> np.ndarray:
            key = jax.random.PRNGKey(args.seed)
            return generate(
                params,
                prompt,
                key,
                cfg=cfg,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
            ).tokens

    tokenizer = from_index({"tokenizer": manifest.get("tokenizer")}, args.model)
    prompt = tokenizer.prompt(args.prompt)[None]
    check_context(cfg.seq_len, prompt.shape[1], args.max_new_tokens)
    tokens = np.asarray(continuation(prompt))[0]
    if tokenizer.eos_id is not None and tokenizer.eos_id in tokens:  # the text ends there
        tokens = tokens[: list(tokens).index(tokenizer.eos_id)]
    print(args.prompt + tokenizer.decode(tokens))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "generate":
            run(args)
        else:
            export(args)
    except CheckFailed as error:
        print(f"exporter: check failed: {error}", file=sys.stderr)
        return 1
    except BAD_INPUT as error:
        print(f"exporter: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
