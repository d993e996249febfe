"""The subprocess side of the mesh tests: the real Trainer on N virtual CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python mesh_worker.py RUN_DIR KEY=VALUE...

prints one JSON line: the job's device count, each step's loss, the held-out losses, the run's
status, and every parameter's per-device shard shape. With RUN_DIR `memory` it compiles the
train step instead and prints the planner's per-device bytes beside memory_analysis()'s.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
from small_run import small_config

from rtdlm.data import split_documents, stdlib_documents
from rtdlm.train import (
    Batch,
    Callback,
    EvalLog,
    RunConfig,
    StepLog,
    Trainer,
)
from rtdlm.train.config import for_first_start

# Two layers, so a pipeline-free mesh still shards more than one block's parameters.
RUN = ["model.num_layers=2", "data.batch_size=8", "optimizer.learning_rate=3e-3"]
RUN += ["optimizer.warmup_steps=1", "train.eval_every=4"]
RUN += ["model.compute_dtype=float32"]  # meshes compared at float32 tolerances
# One schedule for every run: a 4-step run is then the first half of an 8-step one, and both
# compile the same step (which a test run's compilation cache serves once).
RUN += ["optimizer.decay_steps=8"]


class Record(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.evals: dict[int, float] = {}

    def on_step(self, log: StepLog) -> None:
        self.losses[log.step] = log.loss

    def on_eval(self, log: EvalLog) -> None:
        self.evals[log.step] = log.loss


def memory(cfg: RunConfig) -> dict[str, float]:
    from rtdlm.model import build_with_stats
    from rtdlm.train.loop import make_optimizer, make_train_step
    from rtdlm.train.sharding import batch_sharding, device_memory, make_mesh, mesh_shape
    from rtdlm.train.trainer import abstract_state

    mesh = make_mesh(cfg)
    model, optimizer = build_with_stats(cfg.model), make_optimizer(cfg.optimizer)
    step: Any = make_train_step(model, optimizer, cfg, mesh)  # jitted: has .lower
    rows = (cfg.data.batch_size, cfg.model.seq_len + 1)
    batch = Batch(*[jax.ShapeDtypeStruct(rows, jnp.int32, sharding=batch_sharding(mesh))] * 2)
    compiled = step.lower(abstract_state(cfg, mesh), batch).compile().memory_analysis()
    planned = device_memory(cfg, mesh_shape(cfg.mesh, jax.device_count()))
    return {
        "planned_state": planned.params + planned.optimizer,
        "planned_total": planned.total,
        "compiled_arguments": compiled.argument_size_in_bytes,
        "compiled_total": compiled.argument_size_in_bytes + compiled.temp_size_in_bytes,
    }


@functools.cache
def data() -> Any:
    """The built-in corpus, split once for every job of a worker process."""
    return split_documents(stdlib_documents())


def job(run_dir: str, *sets: str) -> dict[str, Any]:
    """One run on this process's devices, or with run_dir "memory", one memory comparison."""
    cfg = small_config(*RUN, *sets)
    if run_dir == "memory":
        return memory(for_first_start(cfg))
    record = Record()
    result = Trainer(cfg, data(), run_dir, [record], compile_cache=False).run()
    shards = {
        f"{module}/{name}": list(value.sharding.shard_shape(value.shape))
        for module, leaves in (result.params or {}).items()
        for name, value in leaves.items()
    }
    return {
        "devices": jax.device_count(),
        "status": result.status,
        "losses": record.losses,
        "evals": record.evals,
        "shards": shards,
    }


def main() -> None:
    """argv: one job's arguments, or a JSON list of jobs (one JAX start for them all); prints
    the result, or the list of results, as one JSON line."""
    args = sys.argv[1:]
    if args[0].startswith("["):
        print(json.dumps([job(*arguments) for arguments in json.loads(args[0])]))
    else:
        print(json.dumps(job(*args)))


if __name__ == "__main__":
    main()
