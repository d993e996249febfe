"""The run as a library: init or resume, train, evaluate, checkpoint, recover, stop.

    trainer = Trainer(cfg, data, "runs/exp1", callbacks=[Progress(sys.stdout, 200)])
    result = trainer.run(should_stop=lambda: stop_requested)

Rerunning with the same run directory resumes from its newest intact checkpoint. The loop
never waits for a step it does not need to: step N's metrics are read while step N + 1 runs,
except at the steps that need the state itself (evaluation, checkpoints, the end), where the
held-out loss is computed before the checkpoint so the best one can be kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rtdlm import ckpt
from rtdlm.data.corpus import Splits
from rtdlm.data.hf import save_hf_tokenizer
from rtdlm.data.pipeline import Prefetch, packed_batches
from rtdlm.data.prepare import write_held_out
from rtdlm.data.shards import DataError
from rtdlm.data.tokenizer import Tokenizer
from rtdlm.metrics import Peak, utilization
from rtdlm.model import build_with_stats, flops_per_token, hf, param_count
from rtdlm.train.callbacks import Callback, CheckpointLog, EvalLog, StepLog, StepsFile
from rtdlm.train.config import (
    RunConfig,
    for_first_start,
    for_resume,
    load_yaml,
    resolve,
    to_dict,
    to_yaml,
)
from rtdlm.train.init_from import check_tokenizer, initial_params
from rtdlm.train.loop import (
    Batch,
    StepMetrics,
    TrainState,
    evaluation_batches,
    init_state,
    make_evaluate,
    make_optimizer,
    make_train_step,
    state_from,
)
from rtdlm.train.rundir import (
    RunDirError,
    RunDirLease,
    RunDirUnreachableError,
    run_dir_guard,
)
from rtdlm.train.sharding import (
    MESH_AXES,
    batch_sharding,
    checked_shape,
    device_memory,
    make_mesh,
    state_shardings,
)

log = logging.getLogger(__name__)

Status = Literal["completed", "stopped", "nonfinite", "checkpoint_error", "data_error"]
MAX_ROLLBACKS = 3


@dataclass(frozen=True)
class RunResult:
    status: Status  # completed and stopped are successes; the others come with a message
    config: RunConfig  # as resolved against the run directory (decay_steps fixed)
    start_step: int  # where this process started: 0 for a fresh run
    step: int  # the last step taken
    tokens: int  # tokens this process trained on
    seconds: float
    evals: tuple[EvalLog, ...]
    params: hk.Params | None  # after the last step
    checkpoints: epath.Path  # local, or s3:// or gs://
    last_checkpoint: int | None  # the newest committed checkpoint
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("completed", "stopped")

    def summary(self) -> str:
        """One line for the end of a run."""
        evals = self.evals
        held_out = f"held-out loss {evals[0].loss:.4f} -> {evals[-1].loss:.4f}" if evals else ""
        best = min((e.loss for e in evals), default=float("nan"))
        return (
            f"{self.step} steps ({self.step - self.start_step} this run, {self.tokens:,} tokens) "
            f"in {self.seconds:.1f}s | {held_out} | best held-out loss {best:.4f} | "
            f"checkpoint {self.checkpoints}/{self.last_checkpoint}"
        )


class _Pending(NamedTuple):
    """A dispatched step whose metrics have not been read yet."""

    step: int
    metrics: StepMetrics
    tokens: int
    data_wait: float


@dataclass(frozen=True)
class _End:
    """How the step loop ended, with the state it ended on; `save`: checkpoint that state
    (a run stopped early) unless it is saved already."""

    status: Status
    message: str
    step: int
    state: TrainState
    position: dict[str, Any] | None = None
    save: bool = False


class _Halt(Exception):
    """Ends the step loop with a status other than completed."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


class Trainer:
    """Runs `cfg` on `data` in `run_dir`; callbacks hear every step, evaluation and commit.

    A class only to hold what a run is made of; `run` does the work and returns a RunResult.
    """

    def __init__(
        self,
        cfg: RunConfig,
        data: Splits,
        run_dir: str | Path,
        callbacks: Sequence[Callback] = (),
        *,
        resume: bool = True,
        restart_if_all_corrupt: bool = False,
        compile_cache: bool = True,
        peak: Peak | None = None,
        tokenizer: Tokenizer | None = None,
        lease_seconds: float = 60.0,
    ) -> None:
        """`restart_if_all_corrupt`: where every checkpoint in the run dir is corrupt, set them
        aside and train from step 0 (without it, such a run dir is refused). `peak`: what MFU
        is against (rtdlm.metrics.peak_flops); without one, no MFU. `tokenizer`: the data's,
        recorded in every checkpoint and kept in `<run_dir>/data/` with the first held-out
        documents, so the run exports and samples after its data directory has moved.
        `run_dir` may be s3://bucket/prefix or gs://bucket/prefix; there one writer is kept by
        a lease that lapses `lease_seconds` after its holder stops renewing it."""
        try:
            self.run_dir = ckpt.storage_path(run_dir)
        except ckpt.StoragePathError as error:
            raise RunDirError(f"run dir {error}") from None
        self.cfg, self.data, self.lease_seconds = cfg, data, lease_seconds
        self.callbacks = list(callbacks)
        self.resume, self.restart_if_all_corrupt = resume, restart_if_all_corrupt
        self.compile_cache, self.peak, self.tokenizer = compile_cache, peak, tokenizer

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> RunResult:
        """Trains to train.max_steps, or until should_stop() says so after a step; then
        checkpoints. Bad input (ConfigError, DataError, RunDirError, CheckpointError) raises
        before any file is written or changed; what goes wrong while training is in the result,
        except losing the object store a run dir is on (RunDirUnreachableError).
        """
        try:
            return self._run(should_stop)
        except Exception as error:
            if not (ckpt.is_remote(self.run_dir) and ckpt.storage_unreachable(error)):
                raise
            raise RunDirUnreachableError(
                f"lost run dir {self.run_dir}: {ckpt.one_line(error)}; the checkpoints committed "
                "before stay restorable: run the same command once the storage answers, to "
                "resume from the newest"
            ) from error

    def _run(self, should_stop: Callable[[], bool]) -> RunResult:
        held_out = evaluation_batches(self.data, self.cfg)  # too little data: DataError now
        next(packed_batches(self.data.train, self.cfg.data.batch_size, self.cfg.model.seq_len, 0))
        mesh = make_mesh(self.cfg)  # a mesh that does not fit: ConfigError now
        # One writer per run dir: process 0 writes everything but checkpoints (orbax has every
        # process write its own shards of those)
        writer = jax.process_index() == 0
        guard = run_dir_guard(self.run_dir, self.lease_seconds) if writer else None
        with guard or contextlib.nullcontext():
            if isinstance(guard, RunDirLease):  # another trainer took over: stop at once
                should_stop = _checked(guard, should_stop)
            cfg, fresh, start_over = self._settle_config()
            # before anything compiles: restarts reuse compiled steps (kept locally only)
            if self.compile_cache and not ckpt.is_remote(self.run_dir):
                use_compile_cache(self.run_dir / "xla-cache")
            retention = ckpt.Retention(keep_last=cfg.train.keep_checkpoints, keep_best=1)
            with ckpt.CheckpointManager(self.run_dir / "checkpoints", retention) as manager:
                restored = None if fresh else self._restore(manager, cfg, mesh)
                if start_over or (restored is None and not fresh):  # all set aside, as asked
                    cfg = self._start_over()
                initial = None
                if restored is None and cfg.train.init_from:  # a resume has its own weights
                    if self.tokenizer is not None:
                        check_tokenizer(cfg.train.init_from, self.tokenizer, self.data.validation)
                    initial = initial_params(cfg, mesh)
                self._save_config(cfg)
                if writer and self.tokenizer is not None and not (self.run_dir / "data").exists():
                    self._write_held_out(self.tokenizer)
                run = _Run(cfg, self, manager, mesh, held_out)
                return run.run(restored, should_stop, initial)

    def _write_held_out(self, tokenizer: Tokenizer) -> None:
        if not ckpt.is_remote(self.run_dir):
            write_held_out(Path(self.run_dir / "data"), self.data.validation, tokenizer)
            return
        with tempfile.TemporaryDirectory(prefix="rtdlm-held-out-") as staging:
            write_held_out(Path(staging) / "data", self.data.validation, tokenizer)
            ckpt.upload(Path(staging) / "data", self.run_dir / "data")

    def _settle_config(self) -> tuple[RunConfig, bool, bool]:
        """The config to run with, whether this is a fresh start, and whether it starts over in
        a run dir whose checkpoints were all set aside (as restart_if_all_corrupt allows);
        refuses a run dir that has held checkpoints where it cannot resume from one. Writes
        nothing."""
        checkpoints = self.run_dir / "checkpoints"
        # committed steps only: a killed first save leaves a tmp dir, which is no run to resume
        has_checkpoints = bool(ckpt.committed_steps(checkpoints))
        set_aside = ckpt.set_aside_steps(checkpoints)
        if (has_checkpoints or set_aside) and not self.resume:
            raise RunDirError(
                f"{checkpoints} already holds checkpoints and resuming is off (--no-resume): "
                "pass a new --run-dir (nothing is overwritten)"
            )
        if set_aside and not has_checkpoints and not self.restart_if_all_corrupt:
            raise ckpt.CheckpointError(
                f"no intact checkpoint in {checkpoints}: every one it held was set aside as "
                f"corrupt ({', '.join(set_aside)}); {_NOTHING_CHANGED}"
            )
        saved_file = self.run_dir / "config.yaml"
        if has_checkpoints and saved_file.is_file():
            saved = resolve(None, load_yaml(saved_file.read_text(), str(saved_file)))
            return for_resume(saved, self.cfg, str(self.run_dir)), False, False
        return (
            for_first_start(self.cfg),
            not has_checkpoints,
            bool(set_aside) and not has_checkpoints,
        )

    def _restore(
        self, manager: ckpt.CheckpointManager, cfg: RunConfig, mesh: Mesh
    ) -> tuple[TrainState, dict[str, Any]] | None:
        """The newest intact checkpoint; None where none is and the run may start over."""
        try:
            return restore_state(manager, cfg, mesh)
        except ckpt.NoIntactCheckpointError as error:
            if not self.restart_if_all_corrupt:
                raise ckpt.CheckpointError(f"{error}; {_NOTHING_CHANGED}") from None
            moved = [manager.set_aside(step) for step, _ in error.corrupt]
            if jax.process_index() == 0:
                log.warning("%s; set aside as %s", error, ", ".join(map(str, moved)))
            return None

    def _start_over(self) -> RunConfig:
        """A run dir whose checkpoints were all set aside trains from step 0, as asked; its
        step log so far is kept beside the new one."""
        steps_file = self.run_dir / "steps.jsonl"
        if jax.process_index() == 0 and steps_file.exists():
            kept = steps_file.with_name(f"steps-before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            steps_file.rename(kept)
        log.warning("training from step 0 (--restart-if-all-corrupt)")
        return for_first_start(self.cfg)

    def _save_config(self, cfg: RunConfig) -> None:
        """config.yaml, by process 0, atomically: the other processes may be reading it."""
        if jax.process_index() != 0:
            return
        saved_file = self.run_dir / "config.yaml"
        try:
            if ckpt.is_remote(saved_file):  # one PUT: readers see the old file or the new
                saved_file.write_text(to_yaml(cfg))
            else:
                saved_file.with_suffix(".yaml.tmp").write_text(to_yaml(cfg))
                saved_file.with_suffix(".yaml.tmp").replace(saved_file)
        except OSError as error:
            raise RunDirError(
                f"cannot write {saved_file}: {error.strerror or error}: make the run dir "
                "writable or pass another --run-dir"
            ) from None
        log.info("config (%s):\n%s", saved_file, to_yaml(cfg).rstrip())


def _checked(lease: RunDirLease, should_stop: Callable[[], bool]) -> Callable[[], bool]:
    def check_then_ask() -> bool:
        lease.check()
        return should_stop()

    return check_then_ask


# How a refusal to resume ends: what is left as it was, and the ways on.
_NOTHING_CHANGED = (
    "nothing was changed: put intact copies back, pass a new --run-dir, or rerun with "
    "--restart-if-all-corrupt to set them aside and train from step 0"
)


def use_compile_cache(directory: str | os.PathLike[str]) -> None:
    """XLA's persistent compilation cache in `directory`, for every later compile in this
    process: a restarted run loads its compiled steps instead of compiling them again. JAX's
    own variables win where set: JAX_COMPILATION_CACHE_DIR names one cache that every run on
    the machine shares, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS what is worth keeping."""
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(directory))
    if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def describe(cfg: RunConfig, devices: int | None = None) -> str:
    """What a run of `cfg` costs, from the config alone (the trainer's --dry-run). The mesh is
    planned for `devices`, by default the product of the mesh sizes if none is -1, else the
    devices this process sees; nothing is compiled or allocated."""
    sizes = [getattr(cfg.mesh, axis) for axis in MESH_AXES]
    devices = devices or (math.prod(sizes) if -1 not in sizes else jax.device_count())
    shape = checked_shape(cfg, devices)
    memory = device_memory(cfg, shape)
    tokens, per_token = cfg.data.batch_size * cfg.model.seq_len, flops_per_token(cfg.model)
    gib = {k: f"{v / 2**30:.2f} GiB" for k, v in vars(memory).items()}
    mesh = " ".join(f"{axis}={size}" for axis, size in shape.items())
    return (
        f"preset {cfg.preset}: {param_count(cfg.model):,} parameters | "
        f"{per_token / 1e6:,.1f} MFLOPs per token (forward + backward) | "
        f"{per_token * tokens / 1e12:,.3f} TFLOPs per step of {tokens:,} tokens\n"
        f"mesh {mesh} on {devices} device(s); memory estimate per device: "
        f"params {gib['params']} + optimizer {gib['optimizer']} + gradients "
        f"{gib['gradients']} + gathered (FSDP) {gib['gathered']} + activations "
        f"{gib['activations']} = {memory.total / 2**30:.2f} GiB"
    )


def abstract_state(cfg: RunConfig, mesh: Mesh) -> TrainState:
    """Shapes, dtypes and placement on `mesh` of a TrainState: a restore target, nothing
    computed. Restoring into it reshards a checkpoint saved on any other mesh."""
    model, optimizer = build_with_stats(cfg.model), make_optimizer(cfg.optimizer)
    shapes = jax.eval_shape(lambda: init_state(model, optimizer, cfg))
    shardings = state_shardings(mesh, optimizer, shapes)
    return jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
        shapes,
        shardings,
    )


def restore_state(
    manager: ckpt.CheckpointManager, cfg: RunConfig, mesh: Mesh
) -> tuple[TrainState, dict[str, Any]]:
    """The newest intact checkpoint as a TrainState on `mesh`, and its data position."""
    target = abstract_state(cfg, mesh)
    restored = manager.restore_latest(params=target.params, opt_state=target.opt_state)
    replicated = target.step.sharding
    step = jax.device_put(jnp.asarray(restored.step, jnp.int32), replicated)
    nonfinite_in_row = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    return TrainState(step, restored.params, restored.opt_state, nonfinite_in_row), (
        restored.data_state
    )


def global_batch(mesh: Mesh, tokens: np.ndarray, segments: np.ndarray) -> Batch:
    """This process's rows of a batch as one array over the whole mesh (no copy elsewhere)."""
    sharding = batch_sharding(mesh)
    return Batch(
        jax.make_array_from_process_local_data(sharding, tokens),
        jax.make_array_from_process_local_data(sharding, segments),
    )


class _Run:
    """One call of Trainer.run: the loop's moving parts, alive only while it runs."""

    def __init__(
        self,
        cfg: RunConfig,
        trainer: Trainer,
        manager: ckpt.CheckpointManager,
        mesh: Mesh,
        held_out: list[Batch],
    ) -> None:
        self.cfg, self.data, self.manager, self.mesh = cfg, trainer.data, manager, mesh
        self.tokenizer = trainer.tokenizer
        tokenizer = {"tokenizer": trainer.tokenizer.index_entry} if trainer.tokenizer else {}
        self.checkpoint_config = {**to_dict(cfg), **tokenizer}  # what each checkpoint records
        writer = jax.process_index() == 0
        self.run_dir = trainer.run_dir
        self.steps_file = StepsFile(self.run_dir / "steps.jsonl") if writer else None
        self.callbacks = [*([self.steps_file] if self.steps_file else []), *trainer.callbacks]
        model, optimizer = build_with_stats(cfg.model), make_optimizer(cfg.optimizer)
        self.train_step = make_train_step(model, optimizer, cfg, mesh)
        local = [self._local_rows(batch) for batch in held_out]
        self.evaluate = make_evaluate(model, [global_batch(mesh, *b) for b in local], mesh)
        shapes = jax.eval_shape(lambda: init_state(model, optimizer, cfg))
        shardings = state_shardings(mesh, optimizer, shapes)
        self.init = jax.jit(lambda: init_state(model, optimizer, cfg), out_shardings=shardings)
        self.start_from = jax.jit(lambda p: state_from(p, optimizer), out_shardings=shardings)
        self.flops_per_token = flops_per_token(cfg.model)
        self.peak, self.peak_raised = trainer.peak, False
        self.evals: list[EvalLog] = []
        self.saving: dict[int, float] = {}  # saves started and not yet reported: blocking time
        self.last_saved: int | None = manager.latest_step()
        self.tokens = 0
        self.rollbacks = 0
        self.last_done = time.perf_counter()
        self.profiling = False
        self.profile_dir = self.run_dir / "profile"
        self.save_failed = False
        self.start_step = 0

    # -- the loop ------------------------------------------------------------------------------

    def run(
        self,
        restored: tuple[TrainState, dict[str, Any]] | None,
        should_stop: Callable[[], bool],
        initial_params: Any = None,
    ) -> RunResult:
        """From `restored`, else from `initial_params` (train.init_from's), else from a random
        init."""
        started = time.perf_counter()
        if restored is None:
            start = self.init() if initial_params is None else self.start_from(initial_params)
            state, position = start, None
        else:
            state, position = restored
            log.info("resumed from step %d in %s", int(state.step), self.manager.directory)
        self.start_step = int(state.step)
        for callback in self.callbacks:
            callback.on_start(self.cfg, self.run_dir, self.start_step)
        try:
            end = self._wind_down(self._train(state, position, should_stop, restored is None))
        except BaseException as error:
            for callback in self.callbacks:
                callback.on_error(error)
            raise
        finally:
            self._stop_profile()
            if self.steps_file is not None:
                self.steps_file.close()
        result = RunResult(
            status=end.status,
            config=self.cfg,
            start_step=self.start_step,
            step=end.step,
            tokens=self.tokens,
            seconds=time.perf_counter() - started,
            evals=tuple(self.evals),
            params=end.state.params if end.step > self.start_step else None,
            checkpoints=self.manager.directory,
            last_checkpoint=self.manager.latest_step(),
            message=end.message,
        )
        for callback in self.callbacks:
            callback.on_end(result)
        return result

    def _train(
        self,
        state: TrainState,
        position: dict[str, Any] | None,
        should_stop: Callable[[], bool],
        fresh: bool,
    ) -> _End:
        """The step loop: each way it ends is one return below. Step N's metrics are read
        (`_finish`) while step N + 1 runs, so every exit first finishes the step in flight."""
        step, max_steps = self.start_step, self.cfg.train.max_steps
        if step >= max_steps:
            return _End("completed", f"nothing to do, step {step} >= train.max_steps", step, state)
        if fresh:
            self._evaluate(0, state)
        stream, pending = self._batches(position), None
        try:
            while step < max_steps:
                try:
                    if should_stop():
                        self._finish(pending)
                        return _End("stopped", "", step, state, position, save=True)
                    if self._profile_starts(step):
                        self._finish(pending)
                        pending = None
                        self._start_profile()
                    begin = time.perf_counter()
                    try:
                        batch, position = next(stream)
                    except DataError as error:  # a shard found corrupt on first use
                        self._finish(pending)
                        message = (
                            f"{error}; training stopped before step {step + 1} and the state "
                            "is checkpointed: rerun to resume once the data is fixed"
                        )
                        return _End("data_error", message, step, state, position, save=True)
                    data_wait = time.perf_counter() - begin
                    state, metrics = self.train_step(state, batch)
                    step += 1
                    rows, width = batch.tokens.shape  # global
                    previous = pending
                    pending = _Pending(step, metrics, rows * (width - 1), data_wait)
                    self._finish(previous)  # the step before, read while this one runs
                    if self._due(step):
                        self._finish(pending)
                        pending = None
                        self._at_sync_point(step, state, position)
                except _Rollback as rollback:
                    stream.close()
                    state, step = self._roll_back(rollback)
                    stream, pending = self._batches(position), None
                self._report_commits()
            return _End("completed", "", step, state)  # the last step was due: nothing pending
        except _Halt as halt:  # non-finite steps or a failed save
            return _End(halt.status, str(halt), step, state)
        finally:
            stream.close()

    def _wind_down(self, end: _End) -> _End:
        """Checkpoints a run that ends early and waits for every save; a save that failed
        turns an end that was not already a halt into a checkpoint error."""
        try:
            if end.save and self.last_saved != end.step:
                self._save(end.step, end.state, end.position)
            self._stop_profile()
            try:
                self.manager.wait()
            except ckpt.CheckpointSaveError as error:
                self._checkpoint_failed(error)
            self._report_commits()
        except _Halt as halt:
            return replace(end, status=halt.status, message=str(halt))
        halted = end.status in ("nonfinite", "checkpoint_error")
        if self.save_failed and not halted and self.manager.latest_step() != end.step:
            message = (
                f"the checkpoint of step {end.step} was not saved; the newest is "
                f"{self.manager.latest_step()} in {self.manager.directory}: rerun to resume "
                "from it once the problem above is fixed"
            )
            return replace(end, status="checkpoint_error", message=message)
        return end

    def _batches(self, position: dict[str, Any] | None) -> Prefetch:
        """Global batches on the mesh, packed and placed ahead on a background thread; each
        process packs only its own rows of every batch."""
        cfg = self.cfg
        rows = packed_batches(
            self.data.train,
            cfg.data.batch_size,
            cfg.model.seq_len,
            cfg.data.shuffle_seed,
            position,
            jax.process_index(),
            jax.process_count(),
            fetch_ahead=cfg.data.prefetch,
        )
        placed = ((global_batch(self.mesh, t, s), p) for t, s, p in rows)
        return Prefetch(placed, cfg.data.prefetch)

    @staticmethod
    def _local_rows(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """This process's slice of a whole batch every process holds (the held-out set)."""
        count, index = jax.process_count(), jax.process_index()
        rows = len(batch.tokens) // count
        mine = slice(index * rows, (index + 1) * rows)
        return np.asarray(batch.tokens)[mine], np.asarray(batch.segment_ids)[mine]

    def _due(self, step: int) -> bool:
        """Steps whose state is needed: evaluation, checkpoint, the last, a profile's end."""
        train = self.cfg.train
        return (
            step % train.eval_every == 0
            or step % train.checkpoint_every == 0
            or step == train.max_steps
            or (self.profiling and step == self._profile_end)
            or (train.hf_export_every > 0 and step % train.hf_export_every == 0)
        )

    @property
    def _profile_end(self) -> int:
        return self.start_step + 2 + self.cfg.train.profile_steps

    def _profile_starts(self, step: int) -> bool:
        """A profile skips the first two steps (compilation) and is written by process 0."""
        profile = self.cfg.train.profile_steps
        return bool(profile) and step == self.start_step + 2 and jax.process_index() == 0

    def _start_profile(self) -> None:
        where = self.run_dir / "profile"
        if ckpt.is_remote(where):  # written locally, uploaded when it stops
            where = epath.Path(tempfile.mkdtemp(prefix="rtdlm-profile-"))
        self.profile_dir = where
        jax.profiler.start_trace(str(where))
        self.profiling = True

    def _finish(self, pending: _Pending | None) -> None:
        """Waits for a dispatched step, reports it, and applies the non-finite policy."""
        if pending is None:
            return
        metrics = jax.device_get(pending.metrics)
        now = time.perf_counter()
        flops, seconds = self.flops_per_token * pending.tokens, now - self.last_done
        mfu = None
        if self.peak is not None:
            mfu, peak = utilization(flops, seconds, self.peak)
            if peak != self.peak and not self.peak_raised:  # said once; it may rise again
                log.warning(
                    "step %d ran at %s GFLOP/s, above the %s GFLOP/s peak MFU was against "
                    "(%s): the peak is raised to what steps achieve",
                    pending.step,
                    f"{flops / seconds / 1e9:,.0f}",
                    f"{self.peak.flops_per_second / 1e9:,.0f}",
                    self.peak.source,
                )
            self.peak_raised |= peak != self.peak
            self.peak = peak
        entry = StepLog(
            step=pending.step,
            loss=float(metrics.loss),
            learning_rate=float(metrics.learning_rate),
            grad_norm=float(metrics.grad_norm),
            tokens=pending.tokens,
            step_seconds=seconds,
            data_wait_seconds=pending.data_wait,
            flops=flops,
            skipped=not bool(metrics.finite),
            nonfinite_in_row=int(metrics.nonfinite_in_row),
            mfu=mfu,
            peak_flops=None if self.peak is None else self.peak.flops_per_second,
        )
        self.last_done = now
        self.tokens += entry.tokens
        for callback in self.callbacks:
            callback.on_step(entry)
        if entry.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
            self._nonfinite(entry)

    def _nonfinite(self, entry: StepLog) -> None:
        where = f"{entry.nonfinite_in_row} non-finite steps in a row at step {entry.step}"
        can_roll_back = self.last_saved is not None and self.rollbacks < MAX_ROLLBACKS
        if self.cfg.train.on_nonfinite == "rollback" and can_roll_back:
            raise _Rollback(where)
        raise _Halt(
            "nonfinite",
            f"{where}: stopping; lower optimizer.learning_rate or check the data (the last good "
            f"checkpoint is in {self.manager.directory})",
        )

    def _roll_back(self, rollback: _Rollback) -> tuple[TrainState, int]:
        """The last checkpoint's state; the data stream goes on past the batches that went
        bad."""
        self.manager.wait()
        state, _ = restore_state(self.manager, self.cfg, self.mesh)
        self.rollbacks += 1
        log.warning(
            "%s: rolled back to step %d (rollback %d of %d), skipping those batches",
            rollback,
            int(state.step),
            self.rollbacks,
            MAX_ROLLBACKS,
        )
        self.last_done = time.perf_counter()
        return state, int(state.step)

    def _at_sync_point(self, step: int, state: TrainState, position: dict[str, Any]) -> None:
        train = self.cfg.train
        if self.profiling and step == self._profile_end:
            self._stop_profile()
        eval_loss = None
        if step % train.eval_every == 0 or step == train.max_steps:
            eval_loss = self._evaluate(step, state)
        if step % train.checkpoint_every == 0 or step == train.max_steps:
            self._save(step, state, position, eval_loss)
        if train.hf_export_every and step % train.hf_export_every == 0:
            self._export_hf(step, state)
        self.last_done = time.perf_counter()  # evaluation and saving are not step time

    def _export_hf(self, step: int, state: TrainState) -> None:
        """This step's parameters in the Hugging Face layout, in <run-dir>/hf/<step>: gathered
        from every process, written by process 0 into a hidden directory renamed into place.
        A failure is a warning: the checkpoints are the run's record."""
        params = multihost_utils.process_allgather(state.params, tiled=True)
        if jax.process_index() != 0:
            return
        started, out = time.perf_counter(), self.run_dir / "hf" / str(step)
        remote = ckpt.is_remote(out)  # staged in a local folder, then uploaded
        staging = Path(
            tempfile.mkdtemp(prefix="rtdlm-hf-") if remote else out.with_name(f".{step}.partial")
        )
        tokenizer = self.tokenizer
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            bos, eos = (tokenizer.bos_id, tokenizer.eos_id) if tokenizer else (None, None)
            config = hf.hf_config(self.cfg.model, "float32", bos, eos)
            hf.save(staging, hf.to_hf(params, self.cfg.model), config)
            if tokenizer is not None:
                try:
                    save_hf_tokenizer(tokenizer, staging, self.cfg.model.seq_len)
                except DataError as error:
                    log.warning("Hugging Face layout of step %d has no tokenizer: %s", step, error)
            if remote:
                if out.exists():
                    out.rmtree()
                ckpt.upload(staging, out)
                shutil.rmtree(staging, ignore_errors=True)
            else:
                shutil.rmtree(out, ignore_errors=True)
                staging.rename(out)
        except OSError as error:
            log.warning("Hugging Face export at step %d failed: %s", step, error)
            shutil.rmtree(staging, ignore_errors=True)
            return
        seconds = time.perf_counter() - started
        log.info("Hugging Face layout of step %d in %s (%.1fs)", step, out, seconds)

    def _stop_profile(self) -> None:
        if self.profiling:
            jax.profiler.stop_trace()
            self.profiling = False
            if self.profile_dir != self.run_dir / "profile":
                ckpt.upload(Path(self.profile_dir), self.run_dir / "profile")
                shutil.rmtree(self.profile_dir, ignore_errors=True)
            log.info("profile written to %s", self.run_dir / "profile")

    def _evaluate(self, step: int, state: TrainState) -> float:
        entry = EvalLog(step, self.evaluate(state.params))
        self.evals.append(entry)
        for callback in self.callbacks:
            callback.on_eval(entry)
        return entry.loss

    # -- checkpoints ---------------------------------------------------------------------------

    def _save(
        self,
        step: int,
        state: TrainState,
        position: dict[str, Any] | None,
        eval_loss: float | None = None,
    ) -> None:
        """Starts an async save of a finite state; only good states are saved, so a rollback
        lands before the trouble."""
        if int(state.nonfinite_in_row) != 0:
            return
        for _ in range(2):  # an earlier save's failure surfaces here first; then this one goes
            try:
                info = self.manager.save(
                    step,
                    params=state.params,
                    opt_state=state.opt_state,
                    data_state=position or {},
                    config=self.checkpoint_config,
                    metrics=None if eval_loss is None else {"eval_loss": eval_loss},
                )
            except ckpt.CheckpointSaveError as error:
                self._checkpoint_failed(error)
                self._halt_or_go_on(error)
                continue
            self.saving[step] = info.blocking_seconds
            self.last_saved = step
            return

    def _report_commits(self) -> None:
        """Tells callbacks about saves that have committed since; never blocks."""
        try:
            step = self.manager.committed()
        except ckpt.CheckpointSaveError as error:
            self._checkpoint_failed(error)
            self._halt_or_go_on(error)
            return
        if step is None:
            return
        for saved in sorted(s for s in self.saving if s <= step):
            entry = CheckpointLog(
                saved, str(self.manager.directory / str(saved)), self.saving.pop(saved)
            )
            for callback in self.callbacks:
                callback.on_checkpoint_committed(entry)

    def _checkpoint_failed(self, error: ckpt.CheckpointSaveError) -> None:
        self.save_failed = True
        self.saving.pop(error.step, None)
        if self.last_saved == error.step:
            self.last_saved = error.last_good
        entry = CheckpointLog(error.step, str(error.path), 0.0, error=str(error))
        for callback in self.callbacks:
            callback.on_checkpoint_failed(entry)

    def _halt_or_go_on(self, error: ckpt.CheckpointSaveError) -> None:
        if self.cfg.train.on_checkpoint_error == "stop":
            raise _Halt("checkpoint_error", str(error))
        log.warning("%s; training goes on (train.on_checkpoint_error=continue)", error)


class _Rollback(Exception):
    """Raised inside the loop to restore the last checkpoint and go on."""
