"""The Trainer end to end in-process: what it reports, resumes, keeps and refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
import pytest
from small_run import SMALL, small_config

from rtdlm import ckpt
from rtdlm.data import Splits, split_documents
from rtdlm.data.corpus import stdlib_documents
from rtdlm.data.shards import corpus_from_documents
from rtdlm.train import (
    Callback,
    CheckpointLog,
    EvalLog,
    RunConfig,
    RunDirError,
    RunResult,
    StepLog,
    Trainer,
)

DATA = split_documents(stdlib_documents())


config = small_config


class Recorder(Callback):
    def __init__(self) -> None:
        self.steps: list[StepLog] = []
        self.evals: list[EvalLog] = []
        self.committed: list[CheckpointLog] = []
        self.ended: list[RunResult] = []

    def on_step(self, log: StepLog) -> None:
        self.steps.append(log)

    def on_eval(self, log: EvalLog) -> None:
        self.evals.append(log)

    def on_checkpoint_committed(self, log: CheckpointLog) -> None:
        self.committed.append(log)

    def on_end(self, result: RunResult) -> None:
        self.ended.append(result)


def run(cfg: RunConfig, run_dir: Path, data: Splits = DATA, **kwargs: object) -> Recorder:
    recorder = Recorder()
    result = Trainer(cfg, data, run_dir, [recorder], compile_cache=False).run(**kwargs)  # type: ignore[arg-type]
    assert recorder.ended == [result]
    return recorder


def steps_file(run_dir: Path) -> dict[int, dict]:
    """Each step's line; a step run again after a resume replaces the earlier line."""
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    return {entry["step"]: entry for entry in map(json.loads, lines)}


def leaves(tree: object) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_a_run_reports_every_step_and_evaluation_and_learns(tmp_path: Path) -> None:
    cfg = config(
        *["data.batch_size=8", "optimizer.learning_rate=3e-3", "optimizer.warmup_steps=5"],
        *["train.max_steps=40", "train.eval_every=20", "train.checkpoint_every=15"],
    )
    seen = run(cfg, tmp_path)
    [result] = seen.ended
    assert result.status == "completed" and result.ok and result.step == 40
    assert [s.step for s in seen.steps] == list(range(1, 41))
    assert [e.step for e in seen.evals] == [0, 20, 40] and list(result.evals) == seen.evals
    assert seen.evals[-1].loss < seen.evals[0].loss - 1.0  # from ~ln(256) towards byte stats
    assert all(s.tokens == 8 * 32 and s.step_seconds > 0 and not s.skipped for s in seen.steps)
    assert seen.steps[0].learning_rate == 0.0
    assert seen.steps[5].learning_rate == pytest.approx(3e-3)
    assert [c.step for c in seen.committed] == [15, 30, 40]
    assert list(steps_file(tmp_path)) == list(range(1, 41))
    assert steps_file(tmp_path)[7]["loss"] == seen.steps[6].loss  # exact floats
    final = ckpt.CheckpointManager(tmp_path / "checkpoints", read_only=True).restore()
    assert final.step == 40 and final.data_state == {"epoch": 0, "row": 40 * 8}
    assert leaves(final.params) == leaves(result.params)
    assert "decay_steps: 40" in (tmp_path / "config.yaml").read_text()


def test_same_seed_same_numbers_bit_for_bit(tmp_path: Path) -> None:
    cfg = config("data.batch_size=4", "train.max_steps=3", "train.eval_every=3")
    first, second = run(cfg, tmp_path / "a"), run(cfg, tmp_path / "b")
    assert [s.loss for s in first.steps] == [s.loss for s in second.steps]


def test_resuming_continues_bit_for_bit(tmp_path: Path) -> None:
    cfg = config("data.batch_size=4", "train.max_steps=6", "train.eval_every=3")
    straight = run(cfg, tmp_path / "straight")
    resume = tmp_path / "resumed"
    run(config("data.batch_size=4", "train.max_steps=3", "optimizer.decay_steps=6"), resume)
    resumed = run(cfg, resume)
    assert [s.step for s in resumed.steps] == [4, 5, 6]
    exact = ("loss", "grad_norm", "learning_rate", "skipped")
    assert [{k: e[k] for k in exact} for e in steps_file(resume).values()] == [
        {k: getattr(s, k) for k in exact} for s in straight.steps
    ]
    assert leaves(resumed.ended[0].params) == leaves(straight.ended[0].params)


def test_the_learning_rate_schedule_continues_when_max_steps_grows_on_resume(
    tmp_path: Path,
) -> None:
    """decay_steps is fixed at the first start (6 here): resuming to 10 steps continues the same
    cosine, and past step 6 the rate stays at the floor, as a run planned that way from the
    start does."""
    first = ["data.batch_size=2", "optimizer.warmup_steps=2", "optimizer.learning_rate=1e-2"]
    run(config(*first, "train.max_steps=6"), tmp_path / "run")
    run(config(*first, "train.max_steps=10"), tmp_path / "run")
    planned = run(config(*first, "train.max_steps=10", "optimizer.decay_steps=6"), tmp_path / "b")
    rates = [e["learning_rate"] for e in steps_file(tmp_path / "run").values()]
    assert rates == [s.learning_rate for s in planned.steps]
    assert rates[6:] == [pytest.approx(1e-2 * 0.1, rel=1e-6)] * 4  # min_lr_ratio 0.1
    losses = [e["loss"] for e in steps_file(tmp_path / "run").values()]
    assert losses == [s.loss for s in planned.steps]
    with pytest.raises(ValueError, match=r"optimizer.decay_steps is 6 for the run in .* cannot"):
        run(config(*first, "train.max_steps=12", "optimizer.decay_steps=12"), tmp_path / "run")


def test_the_best_checkpoint_survives_retention_and_restores_by_name(tmp_path: Path) -> None:
    """Memorising one short document helps the held-out loss at first, then hurts it: the best
    evaluation is at step 3, and keep_checkpoints=1 has deleted its neighbours by the end."""
    document = DATA.train.document(3)[:40]
    data = Splits(corpus_from_documents([document] * 100), DATA.validation)
    common = [
        *["data.batch_size=4", "optimizer.learning_rate=0.03", "optimizer.warmup_steps=0"],
        *["optimizer.decay_steps=30", "train.eval_every=3", "train.checkpoint_every=3"],
        "train.keep_checkpoints=1",
    ]
    seen = run(config(*common, "train.max_steps=30"), tmp_path / "run", data)
    best = min(seen.evals[1:], key=lambda e: e.loss)
    assert best.step == 3 and best.loss < min(e.loss for e in seen.evals[2:])
    manager = ckpt.CheckpointManager(tmp_path / "run" / "checkpoints", read_only=True)
    assert manager.steps() == [3, 30]
    assert manager.best_step() == 3
    restored = manager.restore("best")
    only_three = run(config(*common, "train.max_steps=3"), tmp_path / "three", data)
    assert restored.step == 3 and leaves(restored.params) == leaves(only_three.ended[0].params)


def test_step_metrics_are_read_while_the_next_step_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No host sync per step: when a step is reported, the next one is already dispatched,
    except at the steps that need the state (evaluation and checkpoints, here 5 and 10)."""
    import rtdlm.train.trainer as trainer_module

    dispatched: list[int] = []
    make = trainer_module.make_train_step

    def counting(*args: Any) -> Any:
        step = make(*args)

        def counted(state: Any, batch: Any) -> Any:
            dispatched.append(len(dispatched) + 1)
            return step(state, batch)

        return counted

    monkeypatch.setattr(trainer_module, "make_train_step", counting)

    class Watch(Callback):
        ahead: ClassVar[list[tuple[int, int]]] = []

        def on_step(self, log: StepLog) -> None:
            self.ahead.append((log.step, len(dispatched)))

    cfg = config("data.batch_size=2", "train.max_steps=10", "train.eval_every=5")
    Trainer(cfg, DATA, tmp_path, [Watch()], compile_cache=False).run()
    assert Watch.ahead == [(step, step if step in (5, 10) else step + 1) for step in range(1, 11)]


def test_a_rollback_recovers_past_the_bad_batches_and_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The 5th step dispatched meets NaN parameters (a fault injected at the step's edge): steps
    5 and 6 are skipped, the run rolls back to the checkpoint of step 4 and goes on with the
    batches after the bad ones, to a finite finish."""
    import rtdlm.train.trainer as trainer_module

    make = trainer_module.make_train_step
    dispatched = 0

    def poisoning(*args: Any) -> Any:
        step = make(*args)

        def poisoned(state: Any, batch: Any) -> Any:
            nonlocal dispatched
            dispatched += 1
            if dispatched == 5:
                state = state._replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
            return step(state, batch)

        return poisoned

    monkeypatch.setattr(trainer_module, "make_train_step", poisoning)
    cfg = config(
        *["data.batch_size=2", "train.max_steps=10", "train.checkpoint_every=2"],
        *["train.on_nonfinite=rollback", "train.max_nonfinite_in_row=2"],
    )
    with caplog.at_level("WARNING", logger="rtdlm.train"):
        seen = run(cfg, tmp_path)
    [result] = seen.ended
    assert result.status == "completed" and result.step == 10 and dispatched == 12
    steps = [(log.step, log.skipped) for log in seen.steps]
    assert steps[4:8] == [(5, True), (6, True), (5, False), (6, False)]
    assert all(np.isfinite(log.loss) for log in seen.steps[6:])
    assert "rolled back to step 4 (rollback 1 of 3), skipping those batches" in caplog.text


def test_a_stop_request_finishes_the_step_checkpoints_and_resume_continues(
    tmp_path: Path,
) -> None:
    cfg = config("data.batch_size=2", "train.max_steps=8", "train.eval_every=8")
    straight = run(cfg, tmp_path / "straight")
    calls = iter(range(100))
    stopped = run(cfg, tmp_path / "run", should_stop=lambda: next(calls) >= 3)
    [result] = stopped.ended
    assert result.status == "stopped" and result.ok and result.step == 3
    assert result.last_checkpoint == 3 and [c.step for c in stopped.committed] == [3]
    resumed = run(cfg, tmp_path / "run")
    assert [s.step for s in resumed.steps] == [4, 5, 6, 7, 8]
    assert [s.loss for s in stopped.steps + resumed.steps] == [s.loss for s in straight.steps]


def test_a_run_dir_that_is_a_file_a_url_or_in_use_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config("data.batch_size=2", "train.max_steps=2")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunDirError, match=r"^run dir hdfs://runs/a is a URL, and hdfs:// storage"):
        Trainer(cfg, DATA, "hdfs://runs/a")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match=r"run dir .*file is a file: pass a directory"):
        run(cfg, tmp_path / "file")
    from rtdlm.train.rundir import RunDirLock

    with RunDirLock(tmp_path / "busy"):
        with pytest.raises(RunDirError, match=r"is in use by pid \d+ on .* since"):
            run(cfg, tmp_path / "busy")
        assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == [".lock"]
    run(cfg, tmp_path / "busy")  # released: the next run goes ahead


CACHE_HITS = """
import sys, jax
from rtdlm.data import split_documents
from rtdlm.train import Trainer, resolve
from rtdlm.data.corpus import stdlib_documents

events = []
jax.monitoring.register_event_listener(lambda event, **_: events.append(event))
cfg = resolve("tiny", sets=sys.argv[2:], vocab_size=256)
Trainer(cfg, split_documents(stdlib_documents()), sys.argv[1]).run()
print(events.count("/jax/compilation_cache/cache_hits"))
"""


def test_a_restarted_run_compiles_from_its_persistent_cache(tmp_path: Path) -> None:
    """Each run is a new process, as a restarted job is: the second finds the first one's
    compiled step and evaluation in <run_dir>/xla-cache (JAX reports the hits)."""

    def hits(max_steps: int) -> int:
        sets = [*SMALL, "data.batch_size=2", f"train.max_steps={max_steps}"]
        # the run dir's cache rather than the test run's shared one, keeping every compile: how
        # long one takes against the 0.5 s threshold depends on the CPU, and the eval's does not
        # reach it on every kind
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env |= {"PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        command = [sys.executable, "-c", CACHE_HITS, str(tmp_path), *sets]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    assert hits(2) == 0
    assert hits(4) >= 2  # the step and the evaluation, at least
    assert any((tmp_path / "xla-cache").iterdir())


def test_a_profile_window_is_traced(tmp_path: Path) -> None:
    run(config("data.batch_size=2", "train.max_steps=6", "train.profile_steps=2"), tmp_path)
    assert any(p.suffix == ".gz" or "xplane" in p.name for p in (tmp_path / "profile").rglob("*"))


def test_a_mixture_of_experts_model_trains_with_its_auxiliary_losses(tmp_path: Path) -> None:
    cfg = config(
        *["model.num_layers=2", "model.moe_every=2", "model.num_experts=4", "data.batch_size=4"],
        *["optimizer.learning_rate=3e-3", "optimizer.warmup_steps=2", "train.max_steps=12"],
        "train.eval_every=12",
        "train.z_loss_weight=1e-4",
    )
    seen = run(cfg, tmp_path)
    assert all(np.isfinite(s.loss) for s in seen.steps)
    assert seen.evals[-1].loss < seen.evals[0].loss
    assert "block_1/moe/router" in (seen.ended[0].params or {})


def test_mfu_is_never_above_one_and_a_low_peak_is_raised_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peak measured under load (or by a probe slower than the model's dots) is below what
    the steps reach: MFU stays at most 1, the peak rises to the achieved rate, said once."""
    from rtdlm.metrics import Peak

    low = Peak(1e3, "measured: a probe under load")
    recorder = Recorder()
    cfg = config("data.batch_size=2", "train.max_steps=4")
    with caplog.at_level("WARNING", logger="rtdlm.train"):
        Trainer(cfg, DATA, tmp_path, [recorder], compile_cache=False, peak=low).run()
    mfus = [log.mfu for log in recorder.steps]
    assert all(m is not None and 0 < m <= 1 for m in mfus) and mfus[0] == 1.0
    peaks = [log.peak_flops or 0.0 for log in recorder.steps]
    first = recorder.steps[0]
    assert peaks[0] == first.flops / first.step_seconds
    assert peaks == sorted(peaks)  # only ever raised
    raised = [r.getMessage() for r in caplog.records if "peak MFU was against" in r.getMessage()]
    assert len(raised) == 1 and raised[0].startswith("step 1 ran at ")
    assert raised[0].endswith(
        "above the 0 GFLOP/s peak MFU was against (measured: a probe under load): the peak is "
        "raised to what steps achieve"
    )
    assert "mfu" in steps_file(tmp_path)[1]
    without = run(cfg, tmp_path / "none")  # no peak, no MFU
    assert {log.mfu for log in without.steps} == {None}
