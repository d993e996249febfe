"""The subprocess side of the mesh tests: the real Trainer on N virtual CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python mesh_worker.py RUN_DIR KEY=VALUE...

prints one JSON line: the job's device count, each step's loss, the held-out losses, the run's
status, and every parameter's per-device shard shape.
"""

from __future__ import annotations

import json
import sys

import jax

from rtdlm.train import Callback, EvalLog, StepLog, Trainer, resolve, split_documents
from rtdlm.train.data import stdlib_documents

SMALL = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2"]
SMALL += ["model.seq_len=32", "model.d_ff=64", "metrics.enabled=false", "data.batch_size=8"]
SMALL += ["optimizer.learning_rate=3e-3", "optimizer.warmup_steps=1", "train.eval_every=4"]


class Record(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.evals: dict[int, float] = {}

    def on_step(self, log: StepLog) -> None:
        self.losses[log.step] = log.loss

    def on_eval(self, log: EvalLog) -> None:
        self.evals[log.step] = log.loss


def main() -> None:
    run_dir, *sets = sys.argv[1:]
    cfg = resolve("tiny", sets=[*SMALL, *sets], vocab_size=256)
    record = Record()
    data = split_documents(stdlib_documents())
    result = Trainer(cfg, data, run_dir, [record], compile_cache=False).run()
    shards = {
        f"{module}/{name}": list(value.sharding.shard_shape(value.shape))
        for module, leaves in (result.params or {}).items()
        for name, value in leaves.items()
    }
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "status": result.status,
                "losses": record.losses,
                "evals": record.evals,
                "shards": shards,
            }
        )
    )


if __name__ == "__main__":
    main()
