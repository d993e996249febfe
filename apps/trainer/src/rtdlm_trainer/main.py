"""`trainer`: train a decoder-only language model from the command line.

The app edge: arguments, data selection, signals, the metrics server and the terminal. The run
itself (resume, evaluation, checkpoints, recovery) is rtdlm.train.Trainer.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import jax
import numpy as np
from prometheus_client import CollectorRegistry
from tqdm.contrib.logging import logging_redirect_tqdm

from rtdlm.ckpt import CheckpointError, local_path, storage_path
from rtdlm.data import BYTE_VOCAB_SIZE
from rtdlm.data.shards import DataError, read_index
from rtdlm.data.tokenizer import Tokenizer, load_data
from rtdlm.metrics import ExporterError, PrometheusTrainingCallback, peak_flops, start_server
from rtdlm.model import PRESETS, generate, param_count
from rtdlm.train import (
    Callback,
    ConfigError,
    Progress,
    Prometheus,
    RunConfig,
    RunDirError,
    RunResult,
    Trainer,
    distributed,
    host,
    load_yaml,
    resolve,
)
from rtdlm.train.distributed import DistributedError
from rtdlm.train.rundir import RunDirUnreachableError
from rtdlm.train.supervise import Job, supervise
from rtdlm.train.tracking import MLflow, TensorBoard
from rtdlm.train.trainer import describe

BAD_INPUT = (ConfigError, DataError, RunDirError, CheckpointError, ExporterError, DistributedError)
SHORTCUTS = [  # flag, config key, type or fixed value: each is --set KEY=VALUE at its place
    ("--max-steps", "train.max_steps", int),
    ("--batch-size", "data.batch_size", int),
    ("--seq-len", "model.seq_len", int),
    ("--eval-every", "train.eval_every", int),
    ("--checkpoint-every", "train.checkpoint_every", int),
    ("--seed", "train.seed", int),
    ("--metrics-host", "metrics.host", str),
    ("--metrics-port", "metrics.port", int),
    ("--peak-flops", "metrics.peak_flops", float),
    ("--profile", "train.profile_steps", "3"),  # a flag: a fixed value, traces steps 3-5
    ("--no-metrics", "metrics.enabled", "false"),
    ("--init-from", "train.init_from", str),  # a Hugging Face Llama checkpoint directory
]


class SetKey(argparse.Action):
    """Appends KEY=VALUE to the --set list, so shortcuts and --set apply in the order given."""

    def __init__(self, option_strings: list[str], key: str, kind: Any, **kwargs: Any) -> None:
        self.key, self.value = key, kind if isinstance(kind, str) else None
        if self.value is None:
            kwargs["type"] = kind
        super().__init__(option_strings, nargs=0 if self.value else None, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        value = self.value if self.value is not None else values
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), f"{self.key}={value}"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="trainer",
        description="Train an RT-DLM decoder-only transformer. With no data given it trains on "
        "the English documentation that ships with Python, byte-level tokens.",
    )
    parser.add_argument("--preset", help=f"model size: {', '.join(PRESETS)}")
    parser.add_argument("--config", type=local_path, help="YAML file of config sections")
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
        type=storage_path,
        help="a folder, s3://bucket/prefix or gs://bucket/prefix (default: runs/PRESET-TIMESTAMP)",
    )
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=60.0,
        help="on S3/GCS: how long a killed trainer's run dir stays locked (default: 60)",
    )
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the run dir's newest intact checkpoint (default: yes, if any)",
    )
    parser.add_argument(
        "--restart-if-all-corrupt",
        action="store_true",
        help="if every checkpoint in the run dir is corrupt, rename them <step>.corrupt-<time> "
        "(kept) and train from step 0 there; without it such a run dir is refused",
    )
    parser.add_argument("--dry-run", action="store_true", help="print sizes and costs, then exit")
    parser.add_argument(
        "--sample-tokens", type=int, default=120, help="text to generate at the end"
    )
    tracking = parser.add_argument_group("run tracking (process 0)")
    tracking.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TensorBoard event files in RUN_DIR/tensorboard (default: yes)",
    )
    tracking.add_argument(
        "--mlflow",
        metavar="URI",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="log the run to this MLflow tracking server (default: $MLFLOW_TRACKING_URI); the "
        "experiment is $MLFLOW_EXPERIMENT_NAME, else rtdlm",
    )
    hosts = parser.add_argument_group("multi-host jobs (or RTDLM_COORDINATOR_ADDRESS, ...)")
    hosts.add_argument("--coordinator-address", metavar="HOST:PORT", help="process 0's address")
    hosts.add_argument("--num-processes", type=int, help="processes in the job")
    hosts.add_argument("--process-id", type=int, help="this process, 0 .. num-processes - 1")
    hosts.add_argument("--cluster-detection", action="store_true", help="let JAX find the job")
    hosts.add_argument("--join-timeout", type=int, default=300, help="seconds to reach the others")
    hosts.add_argument("--heartbeat-timeout", type=int, default=100, help="seconds: a peer is lost")
    shortcuts = parser.add_argument_group("shortcuts for --set")
    for flag, key, kind in SHORTCUTS:
        shortcuts.add_argument(flag, dest="sets", action=SetKey, key=key, kind=kind, help=key)
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The run config, with the model's vocabulary taken from the data it will train on."""
    file_keys: dict[str, Any] = {}
    if args.config is not None:
        try:
            file_keys = load_yaml(args.config.read_text(), str(args.config))
        except OSError as error:
            raise ConfigError(f"cannot read --config {args.config}: {error.strerror}") from None
    cfg = resolve(args.preset, file_keys, args.sets, BYTE_VOCAB_SIZE)
    if cfg.data.path is None:
        return cfg
    return resolve(args.preset, file_keys, args.sets, read_index(cfg.data.path)["vocab_size"])


def job_cluster(args: argparse.Namespace, environ: Mapping[str, str]) -> distributed.Cluster:
    """This process's job: the flags, else the RTDLM_* variables (what the Helm chart sets)."""
    return distributed.from_environment(
        environ,
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        auto=args.cluster_detection,
        timeout_seconds=args.join_timeout,
        heartbeat_seconds=args.heartbeat_timeout,
    )


def stderr_fd() -> int:
    """sys.stderr's descriptor: not always 2 (a supervised job's child relays it)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return 2


class Signals:
    """SIGTERM/SIGINT: the first asks the run to checkpoint and stop after the current step,
    the second exits at once. This is what Kubernetes preemption (SIGTERM, then SIGKILL) needs."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {
            s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)
        }

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name  # os.write: a handler may interrupt a print
        if self.received is not None:
            os.write(stderr_fd(), f"\n{name} again: exiting now\n".encode())
            os._exit(128 + signum)
        self.received = name
        os.write(
            stderr_fd(),
            f"\n{name}: finishing this step, then checkpointing and exiting (send it "
            "again to exit at once)\n".encode(),
        )

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def summarize(result: RunResult, tokenizer: Tokenizer, sample_tokens: int, stop: str | None) -> int:
    """The end of a run on the terminal, and its exit status."""
    if not result.ok:  # data found corrupt mid-run is bad input, like data corrupt at the start
        print(f"trainer: error: {result.message}", file=sys.stderr)
        return 2 if result.status == "data_error" else 1
    where = f"{result.checkpoints}/{result.last_checkpoint}"
    if result.status == "stopped":
        print(
            f"stopped by {stop} after step {result.step}: checkpoint {where}; run the same "
            "command to resume"
        )
        # Not 0: the run is unfinished, and a Kubernetes Job must start it again (and resume).
        return 128 + signal.Signals[stop].value if stop else 1
    if result.params is None:
        print(f"done: {result.message}")
        return 0
    cfg = result.config.model
    if sample_tokens > 0 and jax.process_count() == 1:
        prompt = tokenizer.prompt(text := "The ")
        budget = min(sample_tokens, cfg.seq_len - len(prompt))
        key = jax.random.PRNGKey(result.config.train.seed)
        sample = generate(
            result.params,
            prompt[None],
            key,
            cfg=cfg,
            max_new_tokens=budget,
            temperature=0.8,
            top_k=40,
            end_token=tokenizer.eos_id,
        )
        print(f"sample: {text + tokenizer.decode(np.asarray(sample.tokens[0]))!r}")
    print(f"done: {result.summary()}")
    return 0


def main(argv: list[str] | None = None, *, supervised: bool = False) -> int:
    """The trainer; `supervised`: a process of a multi-host job trains in a child process, so
    that JAX aborting it (a lost peer) ends in one line (the command sets it)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The libraries' messages are the run's own terminal lines: rtdlm.train's from INFO (resume,
    # config), the others' (a checkpoint set aside, a save that failed) from WARNING.
    run_log = logging.getLogger("rtdlm")
    run_log.setLevel(logging.WARNING)
    logging.getLogger("rtdlm.train").setLevel(logging.INFO)
    run_log.propagate = False
    run_log.handlers = [logging.StreamHandler(sys.stdout)]
    args = parse_args(argv)
    try:
        cluster = job_cluster(args, os.environ)
    except BAD_INPUT as error:
        print(f"trainer: error: {error}", file=sys.stderr)
        return 2
    if supervised and cluster.multi_process:  # a lost peer is then one line (rtdlm.train.supervise)
        job = Job(cluster.num_processes, cluster.heartbeat_seconds, args.run_dir, "trainer: error:")
        code, line = supervise(lambda: train(args, cluster, run_log), job)
        if line:
            print(f"trainer: error: {line}", file=sys.stderr)
        return code
    return train(args, cluster, run_log)


def train(args: argparse.Namespace, cluster: distributed.Cluster, run_log: logging.Logger) -> int:
    """Joins the job, resolves the config and data, trains; the exit status."""
    try:
        distributed.initialize(cluster)  # before anything touches JAX
        who = f"[process {jax.process_index()}/{jax.process_count()}] "
        who = who if jax.process_count() > 1 else ""  # say which process speaks
        run_log.handlers[0].setFormatter(logging.Formatter(who + "%(message)s"))
        cfg = resolve_config(args)
        if args.dry_run:
            print(describe(cfg))
            return 0
        data, tokenizer = load_data(cfg.data.path, cfg.data.verify)
        run_dir = args.run_dir or storage_path(
            Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        peak = peak_flops(cfg.metrics.peak_flops, dtype=cfg.model.compute_dtype)
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
    except BAD_INPUT as error:
        print(f"trainer: error: {error}", file=sys.stderr)
        return 2
    print(
        f"preset {cfg.preset}: params={param_count(cfg.model):,} | data: "
        f"{data.train.num_tokens:,} train / {data.validation.num_tokens:,} held-out tokens | "
        f"MFU against {peak.source}" + (f" | metrics: {server.url}" if server else "")
    )
    progress = Progress(sys.stdout, cfg.train.max_steps, who)
    callbacks: list[Callback] = [progress, Prometheus(metrics)]
    if jax.process_index() == 0:  # one writer of the run's tracking
        callbacks += [TensorBoard()] if args.tensorboard else []
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "rtdlm"
        callbacks += [MLflow(args.mlflow, experiment)] if args.mlflow else []
    trainer = Trainer(
        cfg,
        data,
        run_dir,
        callbacks,
        resume=args.resume,
        restart_if_all_corrupt=args.restart_if_all_corrupt,
        peak=peak,
        tokenizer=tokenizer,
        lease_seconds=args.lease_seconds,
    )
    signals = Signals()
    try:
        with logging_redirect_tqdm([run_log]):
            result = trainer.run(should_stop=lambda: signals.received is not None)
    except RunDirUnreachableError as error:  # a fault, not bad input
        print(f"trainer: error: {error}", file=sys.stderr)
        return 1
    except BAD_INPUT as error:
        print(f"trainer: error: {error}", file=sys.stderr)
        return 2
    finally:
        signals.restore()
        if server is not None:
            server.close()
    return summarize(result, tokenizer, args.sample_tokens, signals.received)


def cli() -> None:
    """The `trainer` command (the PEX's entry point, `python -m rtdlm_trainer.main`): the same
    process restarts once with malloc tunables that keep step buffers mapped between steps, in
    huge pages (rtdlm.train.host), then runs main()."""
    host.restart_with_tunables()
    sys.exit(main(supervised=True))


if __name__ == "__main__":
    cli()
