"""reuse_freed_memory: a repeated CPU step stops faulting its temporary buffer in again.

Each case is its own process: the setting is process-wide and must precede JAX's backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from rtdlm.train.host import cpu_backend_expected

# A jitted step whose temporary buffer (a 4096 x 4096 float32 product, 64 MB) is above
# glibc's largest mmap threshold (32 MB); the median page faults of its later calls.
STEP = """
import json, resource, statistics, sys
from rtdlm.train import host
applied = host.reuse_freed_memory() if sys.argv[1] == "tuned" else False
import jax, jax.numpy as jnp
@jax.jit
def step(x):
    return jnp.tanh(x @ x.T) @ x
x = jnp.ones((4096, 32))
for _ in range(3):
    step(x).block_until_ready()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": statistics.median(faults)}))
"""


def run(mode: str) -> dict[str, int]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", STEP, mode], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_tuned_process_reuses_the_pages_of_its_step_buffers() -> None:
    default, tuned = run("default"), run("tuned")
    assert tuned["applied"]
    # Untuned, each call maps its buffer afresh: 16,384 faults for 64 MB. Tuned, the heap may
    # still grow by a buffer now and then while its free blocks settle (more often on a loaded
    # machine: CI faulted 4 of 8 calls' worth), so the typical call is what is compared.
    assert default["faults"] > 16_384 * 0.9, default
    assert tuned["faults"] < 0.1 * 16_384, (default, tuned)


def test_only_a_cpu_backend_is_tuned() -> None:
    assert cpu_backend_expected({"JAX_PLATFORMS": "cpu"})
    assert cpu_backend_expected({"JAX_PLATFORMS": "cpu,cuda"})
    assert not cpu_backend_expected({"JAX_PLATFORMS": "cuda"})
    assert not cpu_backend_expected({"JAX_PLATFORMS": "tpu,cpu"})
