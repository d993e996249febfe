"""Where a process finds its job: flags first, then RTDLM_* variables; mistakes are one line."""

import pytest

from rtdlm.train.distributed import Cluster, DistributedError, from_environment, initialize

ENV = {"RTDLM_COORDINATOR_ADDRESS": "10.0.0.1:7777", "RTDLM_NUM_PROCESSES": "4"}


def test_flags_win_over_the_environment_and_a_single_process_needs_nothing() -> None:
    cluster = from_environment({**ENV, "RTDLM_PROCESS_ID": "3"}, process_id=1)
    assert cluster == Cluster("10.0.0.1:7777", 4, 1)
    assert cluster.multi_process
    alone = from_environment({})
    assert not alone.multi_process
    initialize(alone)  # nothing to join: returns at once, JAX untouched


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        ({**ENV, "RTDLM_PROCESS_ID": "x"}, {}, "RTDLM_PROCESS_ID='x' is not an integer"),
        (ENV, {}, "needs the coordinator address and this process's id"),
        ({}, {"num_processes": 2, "process_id": 0}, "needs the coordinator address"),
        (ENV, {"process_id": 4}, r"process id 4 is not in 0..3"),
        (ENV, {"process_id": 0, "timeout_seconds": 0}, "at least 1 second"),
    ],
)
def test_an_incomplete_or_malformed_job_is_one_line(
    env: dict[str, str], flags: dict[str, object], message: str
) -> None:
    with pytest.raises(DistributedError, match=message):
        from_environment(env, **flags)


def test_an_address_that_is_not_host_port_is_refused_before_jax_starts() -> None:
    cluster = from_environment({**ENV, "RTDLM_COORDINATOR_ADDRESS": "nohost"}, process_id=1)
    with pytest.raises(DistributedError, match=r"coordinator address 'nohost' is not HOST:PORT"):
        initialize(cluster)
