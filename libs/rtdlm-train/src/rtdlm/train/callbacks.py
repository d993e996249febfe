"""What a run reports, and the callbacks that listen: the step log, a progress display and the
Prometheus metrics. A callback overrides the hooks it needs; the Trainer calls them in order.

Step logs arrive one step late (the Trainer reads a step's numbers while the next one runs),
and never carry the training state: its buffers belong to the next step once dispatched.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from etils import epath
from tqdm import tqdm

from rtdlm import ckpt
from rtdlm.train.rundir import RunDirError

if TYPE_CHECKING:
    from rtdlm.metrics import PrometheusTrainingCallback
    from rtdlm.train.config import RunConfig
    from rtdlm.train.trainer import RunResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepLog:
    step: int
    loss: float
    learning_rate: float
    grad_norm: float
    tokens: int  # targets in the batch (every sequence position, counted or not)
    step_seconds: float  # from the previous step's end to this one's: what throughput sees
    data_wait_seconds: float  # of which this step waited for its batch
    flops: float  # model FLOPs of the step, forward and backward
    skipped: bool  # non-finite loss or gradients: parameters were left unchanged
    nonfinite_in_row: int
    mfu: float | None = None  # model FLOPs utilization (0..1), where the run has a peak
    peak_flops: float | None = None  # the peak FLOP/s `mfu` is against, raised if a step beat it

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.step_seconds if self.step_seconds > 0 else 0.0


@dataclass(frozen=True)
class EvalLog:
    step: int
    loss: float  # token-weighted held-out cross-entropy


@dataclass(frozen=True)
class CheckpointLog:
    step: int
    path: str
    blocking_seconds: float  # how long starting the save held training
    error: str | None = None  # set when the save failed (on_checkpoint_failed)


class Callback:
    """The hooks a run calls; each does nothing until overridden."""

    def on_start(self, cfg: RunConfig, run_dir: epath.Path, step: int) -> None:
        """The run is settled (its config saved, any resume done) and starts at `step`.
        `run_dir` is a local path or, for a run on object storage, an s3:// or gs:// one."""

    def on_step(self, log: StepLog) -> None:
        pass

    def on_eval(self, log: EvalLog) -> None:
        pass

    def on_checkpoint_committed(self, log: CheckpointLog) -> None:
        pass

    def on_checkpoint_failed(self, log: CheckpointLog) -> None:
        pass

    def on_end(self, result: RunResult) -> None:
        pass

    def on_error(self, error: BaseException) -> None:
        """The run raised `error` instead of ending (a bug, an interrupt): no on_end follows."""


class StepsFile(Callback):
    """Appends every step to a JSON-lines file with exact floats: resumed runs add to it.

    One write(2) per line on an O_APPEND descriptor, so lines never interleave or tear; a full
    disk loses lines (logged once) rather than stopping the run: the checkpoint policy decides
    that. Object storage cannot append: there the file is rewritten whole at each committed
    checkpoint, at most every `flush_seconds` between them, and at the end, so a killed run
    loses at most the lines since then, which its resume trains again."""

    def __init__(self, path: Path | epath.Path, flush_seconds: float = 60.0) -> None:
        self.path = path
        self._failing = False
        self._fd = -1
        self._remote: epath.Path | None = None
        self._lines: list[str] = []
        self._flush_seconds, self._flushed = flush_seconds, time.monotonic()
        if ckpt.is_remote(path):
            self._remote = epath.Path(path)
            self._lines = [self._remote.read_text()] if self._remote.exists() else []
            return
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunDirError(
                f"cannot write {path}: {error.strerror}: make the run dir writable or pass "
                "another --run-dir"
            ) from None

    def on_step(self, log: StepLog) -> None:
        hidden = ("flops", "nonfinite_in_row", "peak_flops")
        record = {k: v for k, v in asdict(log).items() if k not in hidden}
        record |= {"tokens_per_second": log.tokens_per_second, "time": time.time()}
        if self._remote is not None:
            self._lines.append(json.dumps(record) + "\n")
            if time.monotonic() - self._flushed > self._flush_seconds:
                self._flush()
            return
        try:
            os.write(self._fd, (json.dumps(record) + "\n").encode())
        except OSError as error:
            if not self._failing:
                logger.warning("cannot append to %s (%s): losing step lines", self.path, error)
            self._failing = True
        else:
            self._failing = False

    def on_checkpoint_committed(self, log: CheckpointLog) -> None:
        if self._remote is not None:
            self._flush()

    def on_end(self, result: RunResult) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._remote is not None:
            self._flush()

    def _flush(self) -> None:
        if self._remote is None:
            return
        self._flushed = time.monotonic()
        try:
            self._remote.write_text("".join(self._lines))
        except Exception as error:  # fsspec's and botocore's errors alike: lines, not the run
            if not self._failing:
                logger.warning("cannot write %s (%s): will try again", self.path, error)
            self._failing = True
        else:
            self._failing = False


class Progress(Callback):
    """A tqdm bar on a terminal; on anything else (logs, pipes) a plain line every few steps.
    Held-out losses are printed as lines in both cases."""

    def __init__(self, file: IO[str], max_steps: int, prefix: str = "") -> None:
        self.file, self.max_steps = file, max_steps
        self.prefix = prefix  # e.g. "[process 1/2] " in a multi-host job
        self.tty = file.isatty()
        self.every = 1 if max_steps <= 500 else max_steps // 250
        self._bar: tqdm[Any] | None = None
        self._start: tuple[int, float] | None = None  # first step seen, and when

    def _numbers(self, log: StepLog) -> str:
        mfu = "" if log.mfu is None else f" | MFU {log.mfu:.1%}"
        skipped = " | SKIPPED (non-finite)" if log.skipped else ""
        return f"loss {log.loss:.4f} | {log.tokens_per_second:,.0f} tokens/s{mfu}{skipped}"

    def on_step(self, log: StepLog) -> None:
        if self._start is None:
            self._start = (log.step - 1, time.perf_counter())
        if self.tty:
            if self._bar is None:
                self._bar = tqdm(
                    total=self.max_steps,
                    initial=log.step - 1,
                    file=self.file,
                    unit="step",
                    desc=self.prefix.strip() or None,
                )
            self._bar.set_postfix_str(self._numbers(log), refresh=False)
            self._bar.update(log.step - self._bar.n)
        elif log.step % self.every == 0 or log.step == self.max_steps or log.skipped:
            first, started = self._start
            eta = (time.perf_counter() - started) / max(log.step - first, 1)
            eta *= self.max_steps - log.step
            self.write(
                f"step {log.step:5d} | {self._numbers(log)} | lr {log.learning_rate:.2e} | "
                f"ETA {eta:,.0f}s"
            )

    def on_eval(self, log: EvalLog) -> None:
        self.write(
            f"step {log.step:5d} | held-out loss {log.loss:.4f} | "
            f"perplexity {math.exp(min(log.loss, 700)):.2f}"
        )

    def write(self, line: str) -> None:
        """A line that does not break the bar."""
        line = self.prefix + line
        if self._bar is not None:
            self._bar.write(line, file=self.file)
        else:
            print(line, file=self.file, flush=True)

    def on_end(self, result: RunResult) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Prometheus(Callback):
    """Feeds rtdlm.metrics' PrometheusTrainingCallback, which never raises."""

    def __init__(self, metrics: PrometheusTrainingCallback) -> None:
        self.metrics = metrics

    def on_step(self, log: StepLog) -> None:
        self.metrics.on_step(
            log.step,
            loss=log.loss,
            learning_rate=log.learning_rate,
            tokens=log.tokens,
            step_seconds=log.step_seconds,
            grad_norm=log.grad_norm,
            data_wait_seconds=log.data_wait_seconds,
            mfu=log.mfu,
            peak_flops=log.peak_flops,
        )

    def on_eval(self, log: EvalLog) -> None:
        self.metrics.on_eval(log.step, loss=log.loss)

    def on_checkpoint_committed(self, log: CheckpointLog) -> None:
        self.metrics.on_checkpoint(log.step, save_seconds=log.blocking_seconds)

    def on_checkpoint_failed(self, log: CheckpointLog) -> None:
        self.metrics.on_checkpoint_error(log.step)
