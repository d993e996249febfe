from pathlib import Path

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from rtdlm.ckpt import orbax_internals


def _async_manager(directory: Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
    return ocp.CheckpointManager(directory, options=options)


def test_the_installed_orbax_has_every_private_attribute_rtdlm_uses(tmp_path: Path) -> None:
    """Fails on an orbax upgrade that moves one, naming it (see orbax_internals.py)."""
    manager = _async_manager(tmp_path / "fresh")
    orbax_internals.check(manager)  # before any save: the futures are not there yet
    manager.save(1, args=ocp.args.StandardSave({"w": jnp.ones(4)}))
    orbax_internals.check(manager)
    manager.wait_until_finished()
    writes = orbax_internals.commit_futures(manager)  # the save's, found where rtdlm looks
    assert writes
    for write in writes:
        write.result(timeout=1.0)  # finished: returns at once
    manager.close()


def test_a_moved_attribute_fails_the_check_naming_it_and_the_module() -> None:
    class Moved:  # what a release without them would look like
        _checkpointer = None

    with pytest.raises(orbax_internals.OrbaxInternalsChanged) as raised:
        orbax_internals.check(Moved())
    message = str(raised.value)
    assert "CheckpointManager._maybe_await_cleanup_tmp_directory" in message
    assert "orbax_internals.py" in message
    assert orbax_internals.commit_futures(Moved()) == []
    orbax_internals.await_tmp_cleanup(Moved())  # degrades quietly


def test_s3_paths_get_tensorstores_s3_driver_and_gs_and_local_ones_are_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from orbax.checkpoint._src.serialization import tensorstore_utils

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    build = tensorstore_utils.build_kvstore_tspec
    orbax_internals.use_s3_driver()
    orbax_internals.use_s3_driver()  # idempotent: wrapped once
    spec = build("s3://b/run/checkpoints/5/params", use_ocdbt=False)
    assert (spec["driver"], spec["bucket"], spec["path"]) == ("s3", "b", "run/checkpoints/5/params")
    assert spec["endpoint"] == "http://127.0.0.1:9000"
    assert build("gs://b/run/5/params", use_ocdbt=False)["driver"] == "gcs"
    assert build("/tmp/run/5/params", use_ocdbt=False) == {
        "driver": "file",
        "path": "/tmp/run/5/params",
    }
