"""`trainer`: train a decoder-only language model from the command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import jax
import numpy as np
from prometheus_client import CollectorRegistry

from rtdlm import ckpt
from rtdlm.metrics import (
    ExporterError,
    MetricsServer,
    PrometheusTrainingCallback,
    peak_flops,
    start_server,
)
from rtdlm.model import PRESETS, ModelConfig, flops_per_token, generate, param_count, preset
from rtdlm.train import BYTE_VOCAB_SIZE, EvalLog, StepLog, TrainConfig, decode, encode, train
from rtdlm.train.data import split_documents, stdlib_documents

log = logging.getLogger("rtdlm.trainer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="trainer",
        description="Train an RT-DLM decoder-only transformer. With no data given it trains on "
        "the English documentation that ships with Python, byte-level tokens.",
    )
    parser.add_argument("--preset", default="tiny", help=f"model size: {', '.join(PRESETS)}")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    parser.add_argument("--seed", type=int, default=0, help="seed for parameters and data order")
    parser.add_argument(
        "--sample-tokens",
        type=int,
        default=120,
        help="bytes of text to generate after training (0: none)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="where checkpoints are written (default: runs/PRESET-TIMESTAMP)",
    )
    parser.add_argument(
        "--metrics-host", default="0.0.0.0", help="address the Prometheus endpoint listens on"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=8000, help="Prometheus endpoint port (0: any free)"
    )
    parser.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    parser.add_argument(
        "--peak-flops",
        type=float,
        default=None,
        help="peak FLOP/s for MFU (default: table for A100/H100/H200, else a measured matmul)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        model_cfg = preset(
            args.preset,
            vocab_size=BYTE_VOCAB_SIZE,
            **({"seq_len": args.seq_len} if args.seq_len is not None else {}),
        )
        overrides = {
            "max_steps": args.max_steps,
            "batch_size": args.batch_size,
            "eval_every": args.eval_every,
        }
        train_cfg = TrainConfig(
            seed=args.seed, **{k: v for k, v in overrides.items() if v is not None}
        )
        peak = peak_flops(args.peak_flops)
    except ValueError as error:
        print(f"trainer: error: {error}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    checkpoints = run_dir.resolve() / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        print(
            f"trainer: error: {checkpoints} already holds checkpoints; " "pass a new --run-dir",
            file=sys.stderr,
        )
        return 2

    registry = CollectorRegistry()
    metrics = PrometheusTrainingCallback(
        registry,
        run=run_dir.name,
        process_index=jax.process_index(),
        peak_flops_per_second=peak.flops_per_second,
    )
    try:
        server = (
            None
            if args.no_metrics
            else start_server(registry, args.metrics_host, args.metrics_port)
        )
    except ExporterError as error:
        print(f"trainer: error: {error}", file=sys.stderr)
        return 2
    try:
        return _train(args, model_cfg, train_cfg, run_dir, checkpoints, metrics, server)
    finally:
        if server is not None:
            server.close()


def _train(
    args: argparse.Namespace,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    run_dir: Path,
    checkpoints: Path,
    metrics: PrometheusTrainingCallback,
    server: MetricsServer | None,
) -> int:
    data = split_documents(stdlib_documents())
    print(
        f"preset {args.preset}: d_model={model_cfg.d_model} layers={model_cfg.num_layers} "
        f"heads={model_cfg.num_heads} seq_len={model_cfg.seq_len} "
        f"params={param_count(model_cfg):,} | "
        f"data: {len(data.train):,} train / {len(data.validation):,} held-out byte tokens",
        flush=True,
    )
    if server is not None:
        print(f"metrics: {server.url}", flush=True)
    flops_per_step_token = flops_per_token(model_cfg)
    started = time.perf_counter()
    evals: list[EvalLog] = []
    last: StepLog | None = None
    for event in train(model_cfg, train_cfg, data):
        if isinstance(event, EvalLog):
            evals.append(event)
            metrics.on_eval(event.step, loss=event.loss)
            print(f"step {event.step:5d} | held-out loss {event.loss:.4f}", flush=True)
            continue
        last = event
        metrics.on_step(
            event.step,
            loss=event.loss,
            learning_rate=event.learning_rate,
            tokens=event.tokens,
            step_seconds=event.step_seconds,
            grad_norm=event.grad_norm,
            data_wait_seconds=event.data_wait_seconds,
            flops=flops_per_step_token * event.tokens,
        )
        print(
            f"step {event.step:5d} | loss {event.loss:.4f} | lr {event.learning_rate:.2e} | "
            f"{event.tokens_per_second:,.0f} tokens/s",
            flush=True,
        )
    assert last is not None  # TrainConfig guarantees at least one step
    with ckpt.CheckpointManager(checkpoints, async_save=False) as manager:
        saved = manager.save(
            last.step,
            params=last.state.params,
            opt_state=last.state.opt_state,
            config={"preset": args.preset, "model": asdict(model_cfg), "train": asdict(train_cfg)},
            metrics={"eval_loss": evals[-1].loss} if evals else None,
        )
    metrics.on_checkpoint(saved.step, save_seconds=saved.blocking_seconds)
    if args.sample_tokens > 0:
        prompt = "The "
        budget = min(args.sample_tokens, model_cfg.seq_len - len(prompt))
        sample = generate(
            last.state.params,
            encode(prompt)[None],
            jax.random.PRNGKey(args.seed),
            cfg=model_cfg,
            max_new_tokens=budget,
            temperature=0.8,
            top_k=40,
        )
        print(f"sample: {prompt + decode(np.asarray(sample.tokens[0]))!r}", flush=True)
    print(
        f"done: {last.step} steps in {time.perf_counter() - started:.1f}s | held-out loss "
        f"{evals[0].loss:.4f} -> {evals[-1].loss:.4f} | checkpoint {checkpoints}/{last.step}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
