"""Joining a multi-host job on JAX's own runtime (jax.distributed), before anything else runs.

Where a job runs comes from the launcher, not the run config: explicit settings (the trainer's
flags, or RTDLM_COORDINATOR_ADDRESS / RTDLM_NUM_PROCESSES / RTDLM_PROCESS_ID, which the Helm
chart's Indexed Job sets), or JAX's own cluster detection (SLURM, Open MPI, Cloud TPU, ...)
when asked for. A process that cannot reach the coordinator fails within `timeout_seconds`; a
peer that stops answering ends the others within `heartbeat_seconds` (JAX's coordination
service aborts them), so an orchestrator restarts the job and it resumes from a checkpoint.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import jax

log = logging.getLogger(__name__)

ENV = {
    "coordinator_address": "RTDLM_COORDINATOR_ADDRESS",
    "num_processes": "RTDLM_NUM_PROCESSES",
    "process_id": "RTDLM_PROCESS_ID",
}


class DistributedError(Exception):
    """This process could not join its job: what it tried, and what to check."""


@dataclass(frozen=True)
class Cluster:
    coordinator_address: str | None = None  # host:port of process 0's coordination service
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False  # let JAX detect the cluster (SLURM, Open MPI, TPU pods, ...)
    timeout_seconds: int = 300  # to reach the coordinator and the other processes
    heartbeat_seconds: int = 100  # silence after which a peer counts as lost

    @property
    def multi_process(self) -> bool:
        return self.auto or (self.num_processes or 1) > 1

    def __post_init__(self) -> None:
        if self.auto or not self.multi_process:
            return
        if self.coordinator_address is None or self.process_id is None:
            raise DistributedError(
                f"a job of {self.num_processes} processes needs the coordinator address and this "
                f"process's id: pass --coordinator-address and --process-id (or set "
                f"{ENV['coordinator_address']} and {ENV['process_id']})"
            )
        if not 0 <= self.process_id < (self.num_processes or 1):
            raise DistributedError(
                f"process id {self.process_id} is not in 0..{(self.num_processes or 1) - 1}"
            )
        if self.timeout_seconds < 1 or self.heartbeat_seconds < 1:
            raise DistributedError("distributed timeouts must be at least 1 second")


def from_environment(env: Mapping[str, str], **explicit: object) -> Cluster:
    """Explicit values (flags) first, then the RTDLM_* variables; a malformed number is one
    DistributedError line."""
    values: dict[str, object] = {}
    for field, variable in ENV.items():
        value = explicit.get(field)
        if value is None and variable in env:
            text = env[variable]
            if field == "coordinator_address":
                value = text
            else:
                try:
                    value = int(text)
                except ValueError:
                    raise DistributedError(f"{variable}={text!r} is not an integer") from None
        values[field] = value
    rest = {k: v for k, v in explicit.items() if k not in ENV and v is not None}
    return Cluster(**values, **rest)  # type: ignore[arg-type]


def _wait_for_coordinator(cluster: Cluster, where: str) -> None:
    """JAX's client aborts the process (a C++ fatal error, no exception) when it cannot reach
    the coordinator; probing its port first turns that case into one clear error."""
    host, _, port = (cluster.coordinator_address or "").rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(
            f"coordinator address {cluster.coordinator_address!r} is not HOST:PORT"
        )
    deadline = time.monotonic() + cluster.timeout_seconds
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"could not join the job at {where} within {cluster.timeout_seconds}s "
                    f"({error.strerror or error}): start process 0 first, with the same "
                    "coordinator address, and check that this host can reach it"
                ) from None
            time.sleep(0.5)


def initialize(cluster: Cluster) -> None:
    """Joins the job, or does nothing for a single process. Call before any other JAX call."""
    if not cluster.multi_process:
        return
    # CPU collectives between processes go over gloo (TCP); accelerators use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = (
        "the cluster JAX detects"
        if cluster.auto
        else f"{cluster.coordinator_address} as process {cluster.process_id} of "
        f"{cluster.num_processes}"
    )
    if not cluster.auto and cluster.process_id != 0:
        _wait_for_coordinator(cluster, where)
    try:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator_address,
            num_processes=cluster.num_processes,
            process_id=cluster.process_id,
            initialization_timeout=cluster.timeout_seconds,
            heartbeat_timeout_seconds=cluster.heartbeat_seconds,
        )
    except Exception as error:  # JAX raises plain RuntimeError/XlaRuntimeError here
        reason = " ".join(str(error).split())[:200]
        raise DistributedError(
            f"could not join the job at {where} within {cluster.timeout_seconds}s ({reason}): "
            "check that every process was started with the same coordinator address and count, "
            "and that process 0 is up and reachable"
        ) from None
    log.info(
        "process %d of %d joined the job: %d devices in all, %d here",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.local_device_count(),
    )
