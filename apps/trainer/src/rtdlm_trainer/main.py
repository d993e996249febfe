"""`trainer`: train a decoder-only language model from the command line.

This is the app edge: files, signals, HTTP and the terminal live here; the libs stay pure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import jax
import numpy as np
from prometheus_client import CollectorRegistry

from rtdlm import ckpt
from rtdlm.metrics import (
    ExporterError,
    MetricsServer,
    Peak,
    PrometheusTrainingCallback,
    peak_flops,
    start_server,
)
from rtdlm.model import PRESETS, flops_per_token, generate, memory_estimate, param_count
from rtdlm.train import (
    BYTE_VOCAB_SIZE,
    ConfigError,
    EvalLog,
    RunConfig,
    StepLog,
    TrainState,
    load_yaml,
    resolve,
    to_yaml,
    train,
)
from rtdlm.train.data import Splits, split_documents, stdlib_documents
from rtdlm.train.loop import init_state, make_optimizer
from rtdlm.train.pipeline import evaluation_rows, packed_batches
from rtdlm.train.shards import DataError, open_split, read_index
from rtdlm.train.tokenizer import BYTES, Tokenizer, from_index

log = logging.getLogger("rtdlm.trainer")

# Config keys that may change between a run and its resumption.
RESUMABLE_CHANGES = ("train.max_steps", "train.eval_every", "train.checkpoint_every", "metrics.")


class UsageError(Exception):
    """Bad input: one line on stderr, exit status 2, nothing written."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="trainer",
        description="Train an RT-DLM decoder-only transformer. With no data given it trains on "
        "the English documentation that ships with Python, byte-level tokens.",
    )
    parser.add_argument("--preset", default=None, help=f"model size: {', '.join(PRESETS)}")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of config sections")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set optimizer.learning_rate=3e-4 (repeatable)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="checkpoints, config.yaml and caches (default: runs/PRESET-TIMESTAMP)",
    )
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the run dir's newest intact checkpoint (default: yes, if any)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print sizes and costs, then exit")
    parser.add_argument(
        "--profile", action="store_true", help="write a jax.profiler trace of steps 3-5"
    )
    parser.add_argument(
        "--sample-tokens", type=int, default=120, help="bytes of text to generate at the end"
    )
    shortcuts = parser.add_argument_group("shortcuts for --set")
    for flag, key, kind in [
        ("--max-steps", "train.max_steps", int),
        ("--batch-size", "data.batch_size", int),
        ("--seq-len", "model.seq_len", int),
        ("--eval-every", "train.eval_every", int),
        ("--checkpoint-every", "train.checkpoint_every", int),
        ("--seed", "train.seed", int),
        ("--metrics-host", "metrics.host", str),
        ("--metrics-port", "metrics.port", int),
        ("--peak-flops", "metrics.peak_flops", float),
    ]:
        shortcuts.add_argument(flag, type=kind, default=None, help=f"= --set {key}=...")
    shortcuts.add_argument(
        "--no-metrics", action="store_true", help="= --set metrics.enabled=false"
    )
    args = parser.parse_args(argv)
    args.shortcut_sets = [
        f"{key}={getattr(args, flag[2:].replace('-', '_'))}"
        for flag, key in [
            ("--max-steps", "train.max_steps"),
            ("--batch-size", "data.batch_size"),
            ("--seq-len", "model.seq_len"),
            ("--eval-every", "train.eval_every"),
            ("--checkpoint-every", "train.checkpoint_every"),
            ("--seed", "train.seed"),
            ("--metrics-host", "metrics.host"),
            ("--metrics-port", "metrics.port"),
            ("--peak-flops", "metrics.peak_flops"),
        ]
        if getattr(args, flag[2:].replace("-", "_")) is not None
    ] + (["metrics.enabled=false"] if args.no_metrics else [])
    return args


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The run config, with the model's vocabulary taken from the data it will train on."""
    file_keys: dict[str, Any] = {}
    if args.config is not None:
        try:
            text = args.config.read_text()
        except OSError as error:
            raise UsageError(f"cannot read --config {args.config}: {error.strerror}") from None
        file_keys = load_yaml(text, str(args.config))
    sets = [*args.shortcut_sets, *args.sets]
    cfg = resolve(args.preset, file_keys, sets, BYTE_VOCAB_SIZE)
    if cfg.data.path is None:
        return cfg
    return resolve(args.preset, file_keys, sets, read_index(Path(cfg.data.path))["vocab_size"])


def load_data(cfg: RunConfig) -> tuple[Splits, Tokenizer]:
    if cfg.data.path is None:
        return split_documents(stdlib_documents()), BYTES
    path = Path(cfg.data.path)
    index = read_index(path)
    splits = Splits(open_split(path, "train", index), open_split(path, "validation", index))
    return splits, from_index(index, path)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumable(saved: RunConfig, now: RunConfig, run_dir: Path) -> None:
    before, after = flatten(dataclasses.asdict(saved)), flatten(dataclasses.asdict(now))
    changed = [
        k for k in after if before.get(k) != after[k] and not k.startswith(RESUMABLE_CHANGES)
    ]
    if changed:
        raise UsageError(
            f"{run_dir} was started with a different config ({', '.join(changed[:5])} differ): "
            "resume it without those changes, or pass a new --run-dir"
        )


def dry_run(cfg: RunConfig) -> None:
    memory = memory_estimate(cfg.model, cfg.data.batch_size // cfg.data.micro_batches)
    tokens = cfg.data.batch_size * cfg.model.seq_len
    print(
        f"preset {cfg.preset}: {param_count(cfg.model):,} parameters | "
        f"{flops_per_token(cfg.model) / 1e6:,.1f} MFLOPs per token (forward + backward) | "
        f"{flops_per_token(cfg.model) * tokens / 1e12:,.3f} TFLOPs per step of {tokens:,} tokens\n"
        f"memory estimate per micro-batch of {cfg.data.batch_size // cfg.data.micro_batches}: "
        f"params {memory.params / 2**30:.2f} GiB + gradients {memory.gradients / 2**30:.2f} GiB "
        f"+ optimizer {memory.optimizer_state / 2**30:.2f} GiB + activations "
        f"{memory.activations / 2**30:.2f} GiB = {memory.total / 2**30:.2f} GiB",
        flush=True,
    )


class Signals:
    """SIGTERM/SIGINT: the first asks for a checkpoint after the current step, the second
    exits at once. This is what Kubernetes preemption (SIGTERM, then SIGKILL) needs."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in self._previous:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # os.write, not print: a handler can interrupt a print to the same stream
        name = signal.Signals(signum).name
        if self.received is not None:
            os.write(2, f"\n{name} again: exiting now\n".encode())
            os._exit(128 + signum)
        self.received = name
        os.write(
            2,
            f"\n{name}: finishing this step, then checkpointing and exiting "
            "(send it again to exit at once)\n".encode(),
        )

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class Progress:
    """A one-line progress bar on a terminal; plain log lines otherwise."""

    def __init__(self, stream: TextIO, max_steps: int, start_step: int) -> None:
        self.stream, self.max_steps, self.start_step = stream, max_steps, start_step
        self.tty = stream.isatty()
        self.every = 1 if max_steps <= 500 else max_steps // 250
        self.started = time.perf_counter()

    def step(self, event: StepLog, mfu: float | None) -> None:
        done = event.step - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done, 1) * (self.max_steps - event.step)
        mfu_text = f" | MFU {mfu:.1%}" if mfu is not None else ""
        skipped = " | SKIPPED (non-finite)" if event.skipped else ""
        if self.tty:
            width = 24
            filled = int(width * event.step / self.max_steps)
            self.stream.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] step {event.step}/{self.max_steps} "
                f"| loss {event.loss:.4f} | {event.tokens_per_second:,.0f} tokens/s{mfu_text} "
                f"| ETA {eta:,.0f}s{skipped}  "
            )
            self.stream.flush()
        elif event.step % self.every == 0 or event.step == self.max_steps or event.skipped:
            print(
                f"step {event.step:5d} | loss {event.loss:.4f} | lr {event.learning_rate:.2e} | "
                f"{event.tokens_per_second:,.0f} tokens/s{mfu_text} | ETA {eta:,.0f}s{skipped}",
                file=self.stream,
                flush=True,
            )

    def message(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        print(text, file=self.stream, flush=True)


def abstract_state(cfg: RunConfig) -> TrainState:
    """Shapes and dtypes of a fresh TrainState, for restoring into: nothing is computed."""
    from rtdlm.model import build_with_stats

    model = build_with_stats(cfg.model)
    optimizer = make_optimizer(cfg.optimizer, cfg.train.max_steps)
    shapes = jax.eval_shape(lambda: init_state(model, optimizer, cfg))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)


def restore(manager: ckpt.CheckpointManager, cfg: RunConfig) -> tuple[TrainState, dict[str, Any]]:
    target = abstract_state(cfg)
    restored = manager.restore_latest(params=target.params, opt_state=target.opt_state)
    assert restored.rng is not None, "trainer checkpoints always hold the RNG key"
    # Restored arrays are committed to a device, fresh ones are not: without this the train
    # step would compile twice more (for the restored state, then for its own outputs).
    uncommitted = partial(jax.tree.map, lambda x: jax.numpy.asarray(np.asarray(x)))
    state = TrainState(
        step=jax.numpy.asarray(restored.step, jax.numpy.int32),
        params=uncommitted(restored.params),
        opt_state=uncommitted(restored.opt_state),
        rng=uncommitted(restored.rng),
        nonfinite_in_row=jax.numpy.asarray(
            restored.metadata.get("nonfinite_in_row", 0), jax.numpy.int32
        ),
    )
    return state, restored.data_state


def report_step(metrics: PrometheusTrainingCallback, event: StepLog, flops: float) -> None:
    """One step's log into the Prometheus metrics; `flops`: the step's model FLOPs."""
    metrics.on_step(
        event.step,
        loss=event.loss,
        learning_rate=event.learning_rate,
        tokens=event.tokens,
        step_seconds=event.step_seconds,
        grad_norm=event.grad_norm,
        data_wait_seconds=event.data_wait_seconds,
        flops=flops,
    )


def save(
    manager: ckpt.CheckpointManager,
    cfg: RunConfig,
    event: StepLog,
    evals: list[EvalLog],
) -> float:
    """Starts an async save; returns how long it blocked training."""
    info = manager.save(
        event.step,
        params=event.state.params,
        opt_state=event.state.opt_state,
        rng=event.state.rng,
        data_state=event.data_state,
        config=dataclasses.asdict(cfg),
        metrics={"eval_loss": evals[-1].loss} if evals and evals[-1].step == event.step else None,
        metadata={"nonfinite_in_row": event.nonfinite_in_row},
    )
    return info.blocking_seconds


def report_checkpoint(
    manager: ckpt.CheckpointManager,
    metrics: PrometheusTrainingCallback,
    blocked: dict[int, float],
) -> None:
    """Reports a save once it has committed, not when it starts: alerts trust the timestamp."""
    step = manager.committed()
    if step is not None and step in blocked:
        metrics.on_checkpoint(step, save_seconds=blocked.pop(step))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        if args.dry_run:
            dry_run(cfg)
            return 0
        data, tokenizer = load_data(cfg)
        # too little data for one batch is an input error: say so before writing anything
        next(packed_batches(data.train, cfg.data.batch_size, cfg.model.seq_len, 0))
        evaluation_rows(data.validation, cfg.data.batch_size, cfg.model.seq_len, 1)
        run_dir = args.run_dir or Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = run_dir.resolve()
        checkpoints = run_dir / "checkpoints"
        has_checkpoints = checkpoints.is_dir() and any(checkpoints.iterdir())
        if has_checkpoints and not args.resume:
            raise UsageError(
                f"{checkpoints} already holds checkpoints and --no-resume was given: "
                "pass a new --run-dir (nothing is overwritten)"
            )
        if has_checkpoints and (run_dir / "config.yaml").exists():
            saved = resolve(None, load_yaml((run_dir / "config.yaml").read_text(), "config.yaml"))
            check_resumable(saved, cfg, run_dir)
        # Before anything compiles: a restarted job reuses compiled steps from here.
        jax.config.update("jax_compilation_cache_dir", str(run_dir / "xla-cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        peak = peak_flops(cfg.metrics.peak_flops)
        registry = CollectorRegistry()
        metrics = PrometheusTrainingCallback(
            registry,
            run=run_dir.name,
            process_index=jax.process_index(),
            peak_flops_per_second=peak.flops_per_second,
        )
        server = (
            start_server(registry, cfg.metrics.host, cfg.metrics.port)
            if cfg.metrics.enabled
            else None
        )
    except (ConfigError, UsageError, ExporterError, DataError, ValueError) as error:
        print(f"trainer: error: {error}", file=sys.stderr)
        return 2
    try:
        return run(args, cfg, data, tokenizer, run_dir, metrics, server, peak)
    finally:
        if server is not None:
            server.close()


def run(
    args: argparse.Namespace,
    cfg: RunConfig,
    data: Splits,
    tokenizer: Tokenizer,
    run_dir: Path,
    metrics: PrometheusTrainingCallback,
    server: MetricsServer | None,
    peak: Peak,
) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    print(f"config ({run_dir / 'config.yaml'}):\n{to_yaml(cfg).rstrip()}", flush=True)
    print(
        f"preset {cfg.preset}: params={param_count(cfg.model):,} | data: {data.train.num_tokens:,} "
        f"train / {data.validation.num_tokens:,} held-out tokens | MFU against {peak.source}",
        flush=True,
    )
    if server is not None:
        print(f"metrics: {server.url}", flush=True)

    retention = ckpt.Retention(keep_last=cfg.train.keep_checkpoints, keep_best=1)
    manager = ckpt.CheckpointManager(run_dir / "checkpoints", retention)
    state, data_state = None, None
    if args.resume and manager.latest_step() is not None:
        try:
            state, data_state = restore(manager, cfg)
        except ckpt.CheckpointError as error:  # nothing intact, or another model's checkpoint
            print(f"trainer: error: {error}", file=sys.stderr)
            manager.close()
            return 2
        print(f"resumed from step {int(state.step)} in {manager.directory}", flush=True)
    start_step = 0 if state is None else int(state.step)
    if start_step >= cfg.train.max_steps:
        print(f"done: nothing to do, step {start_step} >= train.max_steps", flush=True)
        manager.close()
        return 0

    signals = Signals()
    progress = Progress(sys.stdout, cfg.train.max_steps, start_step)
    flops_per_token_ = flops_per_token(cfg.model)
    started = time.perf_counter()
    evals: list[EvalLog] = []
    last: StepLog | None = None
    saved_step = manager.latest_step()
    blocked: dict[int, float] = {}  # saves started, not yet reported as committed
    tokens_seen, code, rollbacks = 0, 0, 0
    profiling = False
    steps_log = (run_dir / "steps.jsonl").open("a")  # every step, exact floats, appended on resume
    try:
        while True:
            restart = None
            for event in train(cfg, data, state, data_state):
                if isinstance(event, EvalLog):
                    evals.append(event)
                    metrics.on_eval(event.step, loss=event.loss)
                    progress.message(
                        f"step {event.step:5d} | held-out loss {event.loss:.4f} | "
                        f"perplexity {math.exp(min(event.loss, 700)):.2f}"
                    )
                    continue
                last = event
                tokens_seen += event.tokens
                steps_log.write(
                    json.dumps(
                        {
                            "step": event.step,
                            "loss": event.loss,
                            "grad_norm": event.grad_norm,
                            "learning_rate": event.learning_rate,
                            "skipped": event.skipped,
                            "tokens_per_second": event.tokens_per_second,
                            "time": time.time(),
                        }
                    )
                    + "\n"
                )
                steps_log.flush()
                step_flops = flops_per_token_ * event.tokens
                report_step(metrics, event, step_flops)
                report_checkpoint(manager, metrics, blocked)
                progress.step(event, step_flops / event.step_seconds / peak.flops_per_second)
                if args.profile and event.step - start_step == 2:
                    jax.profiler.start_trace(str(run_dir / "profile"))
                    profiling = True
                elif profiling and event.step - start_step == 5:
                    jax.profiler.stop_trace()
                    profiling = False
                    progress.message(f"profile of steps 3-5: {run_dir / 'profile'}")
                if event.nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
                    if cfg.train.on_nonfinite == "rollback" and saved_step and rollbacks < 3:
                        manager.wait()
                        rollbacks += 1
                        restored, _ = restore(manager, cfg)
                        state = restored._replace(nonfinite_in_row=jax.numpy.zeros((), "int32"))
                        data_state = event.data_state  # skip the batches that went bad
                        restart = state
                        progress.message(
                            f"{event.nonfinite_in_row} non-finite steps in a row at step "
                            f"{event.step}: rolled back to step {int(state.step)} "
                            f"(rollback {rollbacks} of 3), skipping those batches"
                        )
                        break
                    progress.message(
                        f"trainer: error: {event.nonfinite_in_row} non-finite steps in a row at "
                        f"step {event.step}: stopping; lower optimizer.learning_rate or check "
                        f"the data (the last good checkpoint is in {manager.directory})"
                    )
                    code = 1
                    break
                # only good states are checkpointed, so a rollback lands before the trouble
                if (
                    event.step % cfg.train.checkpoint_every == 0
                    and event.step < cfg.train.max_steps
                    and event.nonfinite_in_row == 0
                ):
                    blocked[event.step] = save(manager, cfg, event, evals)
                    saved_step = event.step
                if signals.received is not None:
                    break
            if restart is None:
                break
        if profiling:
            jax.profiler.stop_trace()
        if last is not None and code == 0 and saved_step != last.step:
            blocked[last.step] = save(manager, cfg, last, evals)
        manager.wait()
        report_checkpoint(manager, metrics, blocked)
    finally:
        steps_log.close()
        signals.restore()
        manager.close()
    if last is None:
        return code
    if signals.received is not None:
        progress.message(
            f"stopped by {signals.received} after step {last.step}: checkpoint "
            f"{manager.directory}/{last.step}; run the same command to resume"
        )
        return 0
    if code == 0 and args.sample_tokens > 0:
        prompt = "The "
        prompt_tokens = tokenizer.encode(prompt)
        budget = min(args.sample_tokens, cfg.model.seq_len - len(prompt_tokens))
        sample = generate(
            last.state.params,
            prompt_tokens[None],
            jax.random.PRNGKey(cfg.train.seed),
            cfg=cfg.model,
            max_new_tokens=budget,
            temperature=0.8,
            top_k=40,
        )
        print(f"sample: {prompt + tokenizer.decode(np.asarray(sample.tokens[0]))!r}", flush=True)
    held_out = f"held-out loss {evals[0].loss:.4f} -> {evals[-1].loss:.4f}" if evals else ""
    best = min((e.loss for e in evals), default=math.nan)
    print(
        f"done: {last.step} steps ({last.step - start_step} this run, {tokens_seen:,} tokens) in "
        f"{time.perf_counter() - started:.1f}s | {held_out} | best held-out loss {best:.4f} | "
        f"checkpoint {manager.directory}/{last.step}",
        flush=True,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
