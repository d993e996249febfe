"""Run tracking through the trainer app: TensorBoard event files read back with TensorBoard's own
reader, and a real MLflow tracking server (SQLite backend, build-support/mlflow-venv.sh)
started here on a loopback port."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SMALL_RUN, free_port, serving, venv_tool

from rtdlm_trainer.main import main as trainer

pytestmark = pytest.mark.slow

FAST = [*SMALL_RUN, "--max-steps", "6", "--eval-every", "3", "--no-metrics"]


def steps(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


def test_tensorboard_holds_every_step_evaluation_and_the_config(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert trainer([*FAST, "--run-dir", str(run)]) == 0
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert loss == pytest.approx(steps(run), rel=1e-6)  # float32 in the event files
    for tag in ("train/learning_rate", "train/grad_norm", "train/tokens_per_second"):
        assert [e.step for e in events.Scalars(tag)] == list(range(1, 7))
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 3, 6]  # 0: before training
    assert [e.step for e in events.Scalars("eval/perplexity")] == [0, 3, 6]
    (config,) = events.Tensors("config/text_summary")
    assert "d_model: 64" in config.tensor_proto.string_val[0].decode()


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` with a SQLite store and served artifacts, on a loopback port."""
    mlflow = venv_tool("RTDLM_MLFLOW", "mlflow command", "mlflow-venv.sh", "RTDLM_REQUIRE_MLFLOW")
    root, port = tmp_path_factory.mktemp("mlflow"), free_port()
    command = [mlflow, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner
    uri = f"http://127.0.0.1:{port}"
    with serving(command, f"{uri}/health", root / "server.log", env=env):
        yield uri


def test_mlflow_gets_params_metrics_artifacts_and_status_and_a_resume_continues_the_run(
    tmp_path: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    assert trainer([*FAST, "--run-dir", str(run), "--mlflow", mlflow_uri]) == 0
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("rtdlm")
    assert experiment is not None
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_id == (run / "mlflow-run-id").read_text().strip()
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.data.params["model.d_model"] == "64" and found.data.params["preset"] == "tiny"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(steps(run), rel=1e-9)
    evals = client.get_metric_history(found.info.run_id, "eval/loss")
    assert sorted(m.step for m in evals) == [0, 3, 6]
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert artifacts == {"config.yaml", "summary.txt"}

    capsys.readouterr()
    assert trainer([*FAST, "--run-dir", str(run), "--mlflow", mlflow_uri, "--max-steps", "8"]) == 0
    assert "resumed from step 6" in capsys.readouterr().out
    again = client.get_run(found.info.run_id)
    assert again.info.status == "FINISHED"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    assert len(client.search_runs([found.info.experiment_id])) == 1


def test_a_tracking_server_that_is_down_is_one_warning_and_training_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, down = tmp_path / "run", f"http://127.0.0.1:{free_port()}"
    began = time.monotonic()
    assert trainer([*FAST, "--run-dir", str(run), "--mlflow", down, "--no-tensorboard"]) == 0
    assert time.monotonic() - began < 90
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "MLflow" in line]
    assert len(warnings) == 1 and f"MLflow at {down} failed" in warnings[0], out
    assert "training goes on untracked" in warnings[0]
    assert sorted(steps(run)) == list(range(1, 7)) and not (run / "mlflow-run-id").exists()
    assert not (run / "tensorboard").exists()  # --no-tensorboard


def test_a_stopped_run_is_killed_in_mlflow(tmp_path: Path, mlflow_uri: str) -> None:
    """The library path: a Trainer with the MLflow callback, stopped after its first step."""
    from mlflow.tracking import MlflowClient

    from rtdlm.data import split_documents, stdlib_documents
    from rtdlm.train import Trainer, resolve
    from rtdlm.train.tracking import MLflow

    sets = ["model.num_layers=1", "model.d_model=64", "model.seq_len=32", "data.batch_size=2"]
    cfg = resolve("tiny", sets=[*sets, "metrics.enabled=false"], vocab_size=256)
    run, tracking = tmp_path / "stopped", MLflow(mlflow_uri, experiment="stopped")
    data = split_documents(stdlib_documents())
    result = Trainer(cfg, data, run, [tracking], compile_cache=False).run(lambda: True)
    assert result.status == "stopped"
    found = MlflowClient(mlflow_uri).get_run((run / "mlflow-run-id").read_text().strip())
    assert found.info.status == "KILLED" and found.info.run_name == "stopped"


def test_a_run_that_raises_is_failed_in_mlflow(tmp_path: Path, mlflow_uri: str) -> None:
    """A callback raising after the first step stands for any error the run does not handle."""
    from mlflow.tracking import MlflowClient

    from rtdlm.data import split_documents, stdlib_documents
    from rtdlm.train import Callback, Trainer, resolve
    from rtdlm.train.tracking import MLflow

    class Broken(Callback):
        def on_step(self, log: object) -> None:
            raise RuntimeError("the disk caught fire")

    sets = ["model.num_layers=1", "model.d_model=64", "model.seq_len=32", "data.batch_size=2"]
    cfg = resolve("tiny", sets=[*sets, "metrics.enabled=false"], vocab_size=256)
    run, tracking = tmp_path / "raised", MLflow(mlflow_uri, experiment="raised")
    data = split_documents(stdlib_documents())
    with pytest.raises(RuntimeError, match="the disk caught fire"):
        Trainer(cfg, data, run, [tracking, Broken()], compile_cache=False).run(lambda: False)
    client = MlflowClient(mlflow_uri)
    found = client.get_run((run / "mlflow-run-id").read_text().strip())
    assert found.info.status == "FAILED"
    summary = client.download_artifacts(found.info.run_id, "summary.txt", str(tmp_path))
    assert Path(summary).read_text() == "RuntimeError: the disk caught fire\n"
