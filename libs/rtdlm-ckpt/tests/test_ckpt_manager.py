import hashlib
import json
import logging
import os
import re
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorstore as ts
import xxhash
from etils import epath

from rtdlm.ckpt import (
    CheckpointError,
    CheckpointManager,
    CorruptCheckpointError,
    NoIntactCheckpointError,
    Retention,
    integrity,
    restore_params,
    retained_steps,
    set_aside_steps,
)
from rtdlm.ckpt.integrity import MANIFEST


def model_params(scale: float = 1.0) -> dict:
    key = jax.random.PRNGKey(0)
    return {
        "layer": {"w": jax.random.normal(key, (64, 32)) * scale, "scale": jnp.ones(32)},
        "embed": jnp.arange(96, dtype=jnp.float32).reshape(3, 32) * scale,
    }


def assert_trees_equal(a: object, b: object) -> None:
    assert str(jax.tree_util.tree_structure(a)) == str(jax.tree_util.tree_structure(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def largest_file(step_dir: Path, item: str) -> Path:
    return max((p for p in (step_dir / item).rglob("*") if p.is_file()), key=os.path.getsize)


def test_everything_saved_comes_back_exactly(tmp_path: Path) -> None:
    params = model_params()
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.update(params, optimizer.init(params), params)[1]
    rng = jax.random.split(jax.random.PRNGKey(1))[0]
    typed_rng = jax.random.key(5)
    with CheckpointManager(tmp_path) as manager:
        manager.save(
            10,
            params=params,
            opt_state=opt_state,
            rng=rng,
            data_state={"epoch": 2, "position": 1234, "shuffle_seed": 7},
            config={"model": {"preset": "tiny"}, "optimizer": {"lr": 3e-4}},
            metrics={"eval_loss": 1.5},
            metadata={"run": "test-run"},
        )
        manager.save(11, params=params, rng=typed_rng)
        manager.wait()
        ckpt = manager.restore(10, params=params, opt_state=opt_state)
        typed = manager.restore(11).rng
    assert typed is not None
    assert ckpt.step == 10
    assert_trees_equal(ckpt.params, params)
    assert_trees_equal(ckpt.opt_state, opt_state)  # optax's named tuples survive via the target
    assert_trees_equal(ckpt.rng, rng)
    assert jax.random.key_impl(typed) == jax.random.key_impl(typed_rng)
    assert_trees_equal(jax.random.key_data(typed), jax.random.key_data(typed_rng))
    assert ckpt.data_state == {"epoch": 2, "position": 1234, "shuffle_seed": 7}
    assert ckpt.config == {"model": {"preset": "tiny"}, "optimizer": {"lr": 3e-4}}
    meta = ckpt.metadata
    assert meta["param_count"] == 64 * 32 + 32 + 96
    assert meta["metrics"] == {"eval_loss": 1.5} and meta["run"] == "test-run"
    assert meta["versions"]["orbax-checkpoint"] and meta["versions"]["jax"] == jax.__version__
    assert meta["created"].startswith("20") and "git_revision" in meta


def test_no_pickle_anywhere_in_a_checkpoint(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=model_params(), data_state={"position": 3})
    for path in (tmp_path / "1").rglob("*"):
        if path.is_file():
            assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"


def test_async_save_returns_before_the_bytes_are_written_and_is_donation_safe(
    tmp_path: Path,
) -> None:
    big = {"w": jax.random.normal(jax.random.PRNGKey(2), (4096, 4096))}  # 64 MiB
    expected = np.asarray(big["w"]).copy()
    clobber = jax.jit(lambda t: jax.tree.map(lambda x: x * 0 - 1, t), donate_argnums=0)
    with CheckpointManager(tmp_path) as manager:
        info = manager.save(1, params=big)
        assert manager.steps() == [] and manager.committed() is None  # still being written
        clobber(big)  # the caller may reuse or donate the buffers right away
        manager.wait()
        assert manager.steps() == [1] and manager.committed() == 1
        np.testing.assert_array_equal(np.asarray(manager.restore().params["w"]), expected)
    assert info.step == 1 and 0 <= info.wait_seconds <= info.blocking_seconds


def test_next_save_waits_for_the_previous_one(tmp_path: Path) -> None:
    big = {"w": jax.random.normal(jax.random.PRNGKey(2), (2048, 4096))}
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=big)
        second = manager.save(2, params=big)
        assert second.wait_seconds > 0
        assert 1 in manager.steps()  # the first was committed before the second began


def test_sync_mode_commits_before_returning(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(1, params=model_params())
        assert manager.steps() == [1]


def test_retention_keeps_last_every_and_best_together(tmp_path: Path) -> None:
    retention = Retention(keep_last=2, keep_every=4, keep_best=2, best_metric="eval_loss")
    losses = {1: 3.0, 2: 0.5, 3: 2.0, 4: 2.5, 5: 0.7, 6: 1.9, 7: 4.0, 8: 3.3, 9: 3.9}
    with CheckpointManager(tmp_path, retention) as manager:
        for step, loss in losses.items():
            metrics = {"eval_loss": loss} if step != 5 else None  # step 5 had no eval
            manager.save(step, params={"x": jnp.full(3, step)}, metrics=metrics)
        manager.wait()
        assert manager.steps() == [2, 4, 6, 8, 9]
    history = [(s, {"eval_loss": v} if s != 5 else None) for s, v in losses.items()]
    assert retained_steps(history, retention) == {2, 4, 6, 8, 9}
    # a new manager reads the metrics back, so best-checkpoint tracking survives a restart
    with CheckpointManager(tmp_path, retention) as manager:
        manager.save(10, params={"x": jnp.full(3, 10)}, metrics={"eval_loss": 9.0})
        manager.wait()
        assert manager.steps() == [2, 4, 6, 8, 9, 10]
        manager.save(11, params={"x": jnp.full(3, 11)}, metrics={"eval_loss": 9.0})
        manager.wait()
        assert manager.steps() == [2, 4, 6, 8, 10, 11]


def test_params_only_never_reads_optimizer_state(tmp_path: Path) -> None:
    params = model_params()
    opt_state = optax.adam(1e-3).init(params)
    with CheckpointManager(tmp_path) as manager:
        manager.save(3, params=params, opt_state=opt_state)
    for path in (tmp_path / "3" / "opt_state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    ckpt = restore_params(tmp_path)
    assert ckpt.step == 3 and ckpt.opt_state is None
    assert_trees_equal(ckpt.params, params)
    with pytest.raises(CorruptCheckpointError, match="opt_state"):
        CheckpointManager(tmp_path, read_only=True).restore(3, opt_state=opt_state)


def test_params_only_restores_bring_the_config(tmp_path: Path) -> None:
    """What an exporter needs to rebuild the model the weights belong to."""
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=model_params(), config={"model": {"d_model": 8}})
        manager.save(2, params=model_params())
    assert restore_params(tmp_path, 1).config == {"model": {"d_model": 8}}
    assert restore_params(tmp_path).config == {}


def test_a_read_only_restore_logs_no_notice_of_being_read_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """orbax warns twice that a read-only manager is read-only; rtdlm asked for it."""
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=model_params())
    with caplog.at_level(logging.INFO):
        restore_params(tmp_path)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corruption_is_detected_naming_the_checkpoint(tmp_path: Path, damage: str) -> None:
    params = model_params()
    with CheckpointManager(tmp_path) as manager:
        manager.save(5, params=params)
    victim = largest_file(tmp_path / "5", "params")
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    with pytest.raises(
        CorruptCheckpointError, match=r"checkpoint step 5 in .* is corrupt: params/"
    ):
        restore_params(tmp_path, step=5)


def test_data_files_are_checked_from_the_bytes_restore_read(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as manager:
        manager.save(5, params=model_params())
    victim = largest_file(tmp_path / "5", "params")
    from_disk: list[str] = []
    hash_file = integrity._digest

    def recording(path: epath.Path, kind: str) -> str:
        from_disk.append(str(path))
        return hash_file(path, kind)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(integrity, "_digest", recording)
        restore_params(tmp_path, step=5)
        assert from_disk and str(victim) not in from_disk  # hashed as read, not read again
        data = bytearray(victim.read_bytes())
        data[len(data) // 3] ^= 0x10
        victim.write_bytes(bytes(data))
        name = victim.relative_to(tmp_path / "5")
        with pytest.raises(CorruptCheckpointError, match=f"{name} does not match its XXH3-128"):
            restore_params(tmp_path, step=5)
    assert str(victim) not in from_disk


def test_manifests_hash_files_of_any_size_as_their_bytes(tmp_path: Path) -> None:
    contents = {
        "empty": b"",
        "one": b"x",
        "page": os.urandom(4096 + 3),
        "sub/big": os.urandom(1 << 20),
    }
    for name, data in contents.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    integrity.write_manifest(epath.Path(tmp_path))
    files = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert {name: entry["xxh3_128"] for name, entry in files.items()} == {
        name: xxhash.xxh3_128(data).hexdigest() for name, data in contents.items()
    }
    integrity.verify(epath.Path(tmp_path))
    (tmp_path / "one").write_bytes(b"y")
    with pytest.raises(integrity.IntegrityError, match="one does not match its XXH3-128 digest"):
        integrity.verify(epath.Path(tmp_path))


def test_sha256_manifests_of_earlier_versions_still_verify(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as manager:
        manager.save(5, params=model_params())
    manifest = tmp_path / "5" / MANIFEST
    files = json.loads(manifest.read_text())["files"]
    assert all(set(entry) == {"bytes", "xxh3_128"} for entry in files.values())
    legacy = {  # format 1, as rtdlm-ckpt 0.1 wrote it
        name: {
            "bytes": entry["bytes"],
            "sha256": hashlib.sha256((tmp_path / "5" / name).read_bytes()).hexdigest(),
        }
        for name, entry in files.items()
    }
    manifest.write_text(json.dumps({"format": 1, "files": legacy}))
    assert_trees_equal(restore_params(tmp_path, step=5).params, model_params())
    victim = largest_file(tmp_path / "5", "params")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(
        CorruptCheckpointError, match=r"params/.* does not match its SHA-256 digest"
    ):
        restore_params(tmp_path, step=5)


def test_uncompressed_arrays_are_read_without_opening_them_in_tensorstore(
    tmp_path: Path,
) -> None:
    def unexpected(*args: object, **kwargs: object) -> None:
        raise AssertionError("opened through tensorstore's zarr driver")

    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (256, 256)), "b": jnp.ones(3)}
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=params)
        manager.wait()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ts, "open", unexpected)
            assert_trees_equal(manager.restore(1, params=params).params, params)


def test_restore_latest_falls_back_to_the_newest_intact_one_and_says_so_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with CheckpointManager(tmp_path, Retention(keep_last=5)) as manager:
        for step in (1, 2, 3):
            manager.save(step, params=model_params(step))
    for step in (2, 3):
        victim = largest_file(tmp_path / str(step), "params")
        victim.write_bytes(victim.read_bytes()[:-7])
    with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path) as manager:
        ckpt = manager.restore_latest(params=model_params())
        assert ckpt.step == 1
        assert_trees_equal(ckpt.params, model_params(1))
        assert manager.steps() == [1]
        manager.save(2, params=model_params(2))  # training goes on from the intact step
    kept = sorted(p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name)
    assert [name.split(".")[0] for name in kept] == ["2", "3"]  # set aside, not deleted
    assert set_aside_steps(tmp_path) == kept
    [record] = [r for r in caplog.records if r.name == "rtdlm.ckpt.manager"]
    line = record.getMessage()
    assert "\n" not in line and line.startswith(f"checkpoint step 3 in {tmp_path} is corrupt: ")
    assert f"; checkpoint step 2 in {tmp_path} is corrupt: " in line
    assert line.endswith(
        f"; moved to {tmp_path / kept[1]}, {tmp_path / kept[0]}; restored step 1 instead"
    )


def test_when_none_is_intact_nothing_is_renamed_and_a_retry_says_the_same(
    tmp_path: Path,
) -> None:
    with CheckpointManager(tmp_path) as manager:
        for step in (1, 2):
            manager.save(step, params=model_params(step))
    for step in (1, 2):
        (tmp_path / str(step) / MANIFEST).unlink()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    errors = []
    for _ in range(2):
        with CheckpointManager(tmp_path) as manager, pytest.raises(NoIntactCheckpointError) as e:
            manager.restore_latest(params=model_params())
        errors.append(str(e.value))
        assert [step for step, _ in e.value.corrupt] == [2, 1]
    assert errors[0] == errors[1] and errors[0].startswith(f"no intact checkpoint in {tmp_path}")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert set_aside_steps(tmp_path) == []


def test_only_corrupt_checkpoints_is_a_clear_error(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=model_params())
    (tmp_path / "1" / MANIFEST).unlink()
    with pytest.raises(
        CheckpointError, match=r"no intact checkpoint in .*step 1.*no rtdlm_manifest"
    ):
        restore_params(tmp_path)


def test_a_manifest_that_is_not_json_is_corruption(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=model_params())
    (tmp_path / "1" / MANIFEST).write_text('{"files": {')
    with pytest.raises(CorruptCheckpointError, match="unreadable"):
        restore_params(tmp_path, step=1)


def test_an_interrupted_save_is_invisible_and_cleaned_up(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=model_params(1))
    half = tmp_path / "2.orbax-checkpoint-tmp"
    (half / "params").mkdir(parents=True)
    (half / "params" / "partial").write_bytes(b"\0" * 100)
    assert restore_params(tmp_path).step == 1
    with CheckpointManager(tmp_path) as manager:
        assert manager.steps() == [1]
        manager.save(2, params=model_params(2))
    assert not half.exists()
    assert_trees_equal(restore_params(tmp_path).params, model_params(2))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"layer": {"w": jnp.zeros((64, 32))}, "embed": jnp.zeros((3, 32))}, "scale"),
        (
            {
                "layer": {"w": jnp.zeros((64, 33)), "scale": jnp.ones(32)},
                "embed": jnp.zeros((3, 32)),
            },
            r"\(64, 33\)",
        ),
    ],
)
def test_a_checkpoint_of_another_structure_is_a_clear_error(
    tmp_path: Path, params: dict, message: str
) -> None:
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=model_params())
    with pytest.raises(CheckpointError, match=r"does not fit the requested state") as error:
        restore_params(tmp_path, params=params)
    assert "different model or optimizer config" in str(error.value)
    assert "\n" not in str(error.value)
    assert re.search(message, str(error.value))


def test_bad_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint directory at .*nothing"):
        restore_params(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*empty"):
        restore_params(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        CheckpointManager(tmp_path / "file")
    with CheckpointManager(tmp_path / "run") as manager:
        manager.save(4, params=model_params())
        with pytest.raises(CheckpointError, match=r"available steps are \[4\]"):
            manager.restore(7)
        with pytest.raises(CheckpointError, match="already holds step 4"):
            manager.save(4, params=model_params())
    with pytest.raises(CheckpointError, match=r"is one checkpoint.*pass .*run and step 4"):
        restore_params(tmp_path / "run" / "4")
    with pytest.raises(CheckpointError, match="read-only"):
        CheckpointManager(tmp_path / "run", read_only=True).save(5, params=model_params())


def test_restored_state_drives_training_identically(tmp_path: Path) -> None:
    optimizer = optax.adam(1e-2)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params: dict, opt_state: optax.OptState) -> tuple[dict, optax.OptState]:
        grads = jax.grad(lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p)))(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    params = model_params()
    opt_state = optimizer.init(params)
    params, opt_state = step(params, opt_state)
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=params, opt_state=opt_state)
        manager.wait()
        ckpt = manager.restore(params=params, opt_state=opt_state)
    straight = step(params, opt_state)
    resumed = step(ckpt.params, ckpt.opt_state)
    assert_trees_equal(straight, resumed)


def test_the_best_checkpoint_survives_retention_and_restores_by_name(tmp_path: Path) -> None:
    retention = Retention(keep_last=1, keep_best=1)
    losses = {10: 3.0, 20: 0.5, 30: 2.0, 40: 0.9}  # the best is an early step
    with CheckpointManager(tmp_path, retention) as manager:
        assert manager.best_step() is None
        for step, loss in losses.items():
            manager.save(step, params=model_params(step), metrics={"eval_loss": loss})
        manager.save(50, params=model_params(50))  # no eval at this step
        manager.wait()
        assert manager.steps() == [20, 50]
        assert manager.best_step() == 20
        best = manager.restore("best")
        assert best.step == 20 and best.metadata["metrics"] == {"eval_loss": 0.5}
        assert_trees_equal(best.params, model_params(20))
    # a restarted run reads the metrics orbax keeps beside each step
    with CheckpointManager(tmp_path, retention) as manager:
        assert manager.best_step() == 20
        manager.save(60, params=model_params(60), metrics={"eval_loss": 0.5})  # a tie: later wins
        manager.wait()
        assert manager.steps() == [60] and manager.best_step() == 60
    assert restore_params(tmp_path, step="best").step == 60
    maximising = Retention(keep_best=1, best_metric="accuracy", best_mode="max")
    with CheckpointManager(tmp_path / "acc", maximising) as manager:
        for step, accuracy in {1: 0.7, 2: 0.9, 3: 0.8}.items():
            manager.save(step, params=model_params(step), metrics={"accuracy": accuracy})
        manager.wait()
        assert manager.best_step() == 2
    assert restore_params(tmp_path / "acc", step="best", retention=maximising).step == 2
    with pytest.raises(
        CheckpointError, match=r"has the metric 'eval_loss'.*one of steps \[1, 2, 3\]"
    ):
        restore_params(tmp_path / "acc", step="best")  # by default: the lowest eval_loss


def test_restore_latest_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=model_params(1))
        assert manager.restore_latest(params=model_params()).step == 1


def test_committed_steps_are_the_numbered_folders_not_a_save_in_flight(tmp_path: Path) -> None:
    from rtdlm.ckpt import committed_steps

    assert committed_steps(tmp_path / "none") == []
    for name in ("16", "8", "24.orbax-checkpoint-tmp-3", "4.corrupt-20261207"):
        (tmp_path / name).mkdir()
    assert committed_steps(tmp_path) == [8, 16]
