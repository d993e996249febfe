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
# glibc's largest mmap threshold (32 MB); page faults counted over its later calls.
STEP = """
import json, resource, sys
from rtdlm.train import host
applied = host.reuse_freed_memory() if sys.argv[1] == "tuned" else False
import jax, jax.numpy as jnp
@jax.jit
def step(x):
    return jnp.tanh(x @ x.T) @ x
x = jnp.ones((4096, 32))
for _ in range(3):
    step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step(x).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
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
    # Untuned, each call maps its buffer afresh: 16,384 faults per call of 64 MB, eight calls.
    # Tuned, the heap may still grow by a buffer or two while its free blocks settle (more
    # often on a loaded machine, where a call's buffer is freed after the next one's is taken).
    assert default["faults"] > 8 * 16_384 * 0.9, default
    assert tuned["faults"] < 0.4 * default["faults"], (default, tuned)


def test_only_a_cpu_backend_is_tuned() -> None:
    assert cpu_backend_expected({"JAX_PLATFORMS": "cpu"})
    assert cpu_backend_expected({"JAX_PLATFORMS": "cpu,cuda"})
    assert not cpu_backend_expected({"JAX_PLATFORMS": "cuda"})
    assert not cpu_backend_expected({"JAX_PLATFORMS": "tpu,cpu"})
