"""Run tracking beside Prometheus and steps.jsonl: TensorBoard event files and MLflow runs.

Both are callbacks a run adds on process 0. Neither may stop or slow training: TensorBoard
writes from tensorboardX's background thread, MLflow logs asynchronously, and an MLflow server
that cannot be reached is one warning, after which the run goes on untracked.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from etils import epath

from rtdlm import ckpt
from rtdlm.train.callbacks import Callback, CheckpointLog, EvalLog, StepLog
from rtdlm.train.config import RunConfig, flatten, to_dict, to_yaml

if TYPE_CHECKING:
    from rtdlm.train.trainer import RunResult

log = logging.getLogger(__name__)

# RunResult.status as MLflow's run status.
MLFLOW_STATUS = {"completed": "FINISHED", "stopped": "KILLED"}  # the rest: FAILED
MLFLOW_RUN_ID = "mlflow-run-id"  # in the run dir: a resumed run logs into the same MLflow run


def _scalars(log: StepLog) -> dict[str, float]:
    values = {
        "train/loss": log.loss,
        "train/learning_rate": log.learning_rate,
        "train/grad_norm": log.grad_norm,
        "train/tokens_per_second": log.tokens_per_second,
    }
    if log.mfu is not None:
        values["train/mfu"] = log.mfu
    return {k: v for k, v in values.items() if math.isfinite(v)}  # a skipped step's NaN loss


def _held_out(log: EvalLog) -> dict[str, float]:
    return {"eval/loss": log.loss, "eval/perplexity": math.exp(min(log.loss, 700))}


class TensorBoard(Callback):
    """Scalars per step and evaluation, and the resolved config as text, as TensorBoard event
    files in `<run-dir>/tensorboard` (`tensorboard --logdir <run-dir>/tensorboard`); created
    when the run starts, so a config the trainer refuses leaves no directory."""

    def __init__(self) -> None:
        self.writer: Any = None
        self.upload_to: epath.Path | None = None  # object storage: written locally, copied up

    def on_start(self, cfg: RunConfig, run_dir: epath.Path, step: int) -> None:
        from tensorboardX import SummaryWriter

        where = str(run_dir / "tensorboard")
        if ckpt.is_remote(run_dir):  # tensorboardX writes to S3 only through boto3
            where, self.upload_to = (
                tempfile.mkdtemp(prefix="rtdlm-tensorboard-"),
                run_dir / "tensorboard",
            )
        self.writer = SummaryWriter(where, flush_secs=10)
        self.writer.add_text("config", "```\n" + to_yaml(cfg) + "```", step)

    def on_checkpoint_committed(self, log: CheckpointLog) -> None:
        self._upload()

    def _upload(self) -> None:
        if self.upload_to is None:
            return
        self.writer.flush()
        try:
            ckpt.upload(Path(self.writer.logdir), self.upload_to)
        except Exception as error:  # the bucket gone: the run goes on, the files stay local
            log.warning("cannot copy TensorBoard files to %s: %s", self.upload_to, error)

    def on_step(self, log: StepLog) -> None:
        for tag, value in _scalars(log).items():
            self.writer.add_scalar(tag, value, log.step)

    def on_eval(self, log: EvalLog) -> None:
        for tag, value in _held_out(log).items():
            self.writer.add_scalar(tag, value, log.step)

    def on_end(self, result: RunResult) -> None:
        if self.writer is not None:
            self._upload()
            self.writer.close()

    def on_error(self, error: BaseException) -> None:
        if self.writer is not None:
            self._upload()
            self.writer.close()


class MLflow(Callback):
    """An MLflow run per training run (the same one again on resume): the resolved config as
    params, metrics per step and evaluation, config.yaml and the summary as artifacts, and the
    run's status at the end. `uri`: the tracking server (or any URI MLflow takes)."""

    def __init__(self, uri: str, experiment: str = "rtdlm") -> None:
        self.uri, self.experiment = uri, experiment
        self.run_id: str | None = None
        self.run_dir = epath.Path()
        self.pending: list[Any] = []

    def on_start(self, cfg: RunConfig, run_dir: epath.Path, step: int) -> None:
        # A down server fails fast rather than retrying for minutes (unless the user said so).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.client, self.run_dir = MlflowClient(self.uri), run_dir
        id_file = run_dir / MLFLOW_RUN_ID
        try:
            if id_file.is_file():
                self.run_id = id_file.read_text().strip()
                self.client.update_run(self.run_id, status="RUNNING")
                return
            found = self.client.get_experiment_by_name(self.experiment)
            experiment = found.experiment_id if found else None
            experiment = experiment or self.client.create_experiment(self.experiment)
            self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
            id_file.write_text(self.run_id + "\n")
            self._log(params={k: str(v) for k, v in flatten(to_dict(cfg)).items()})
        except Exception as error:  # any failure: untracked, never stopped
            self._give_up(error)

    def _give_up(self, error: Exception) -> None:
        reason = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        log.warning("MLflow at %s failed (%s): training goes on untracked", self.uri, reason)
        self.run_id = None

    def _log(
        self,
        metrics: dict[str, float] | None = None,
        step: int = 0,
        params: dict[str, str] | None = None,
    ) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in (metrics or {}).items()]
        values = [Param(k, v[:6000]) for k, v in (params or {}).items()]  # MLflow's limit
        try:
            self.pending.append(
                self.client.log_batch(self.run_id, metrics=batch, params=values, synchronous=False)
            )
        except Exception as error:  # as above
            self._give_up(error)

    def on_step(self, log: StepLog) -> None:
        self._log(_scalars(log), log.step)

    def on_eval(self, log: EvalLog) -> None:
        self._log(_held_out(log), log.step)

    def on_end(self, result: RunResult) -> None:
        self.finish(MLFLOW_STATUS.get(result.status, "FAILED"), result.summary())

    def on_error(self, error: BaseException) -> None:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        self.finish(status, f"{type(error).__name__}: {error}")

    def finish(self, status: str, summary: str = "") -> None:
        """Waits for the queued logging, adds the artifacts and sets the run's status."""
        if self.run_id is None:
            return
        try:
            for future in self.pending:
                future.wait()
            if (self.run_dir / "config.yaml").is_file():  # read here: it may be on S3 or GCS
                config = (self.run_dir / "config.yaml").read_text()
                self.client.log_text(self.run_id, config, "config.yaml")
            if summary:
                self.client.log_text(self.run_id, summary + "\n", "summary.txt")
            self.client.set_terminated(self.run_id, status)
        except Exception as error:  # as above
            self._give_up(error)
