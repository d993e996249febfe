from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtdlm.ckpt import CheckpointError, latest_step, restore, save


def tree() -> dict:
    key = jax.random.PRNGKey(0)
    return {
        "params": {"w": jax.random.normal(key, (4, 3)), "b": jnp.arange(3, dtype=jnp.float32)},
        "step": jnp.asarray(7, jnp.int32),
    }


def test_round_trip_is_exact_and_newest_wins(tmp_path: Path) -> None:
    original = tree()
    save(tmp_path / "ckpt", 1, jax.tree_util.tree_map(jnp.zeros_like, original))
    save(tmp_path / "ckpt", 2, original)
    assert latest_step(tmp_path / "ckpt") == 2
    step, restored = restore(tmp_path / "ckpt", target=original)
    assert step == 2
    for a, b in zip(
        jax.tree_util.tree_leaves(original), jax.tree_util.tree_leaves(restored), strict=False
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.dtype == b.dtype


def test_restore_without_target_reads_arrays(tmp_path: Path) -> None:
    save(tmp_path, 3, tree())
    _, restored = restore(tmp_path)
    np.testing.assert_array_equal(np.asarray(restored["params"]["b"]), [0.0, 1.0, 2.0])


def test_missing_directory_and_step_are_clear_errors(tmp_path: Path) -> None:
    assert latest_step(tmp_path / "nothing") is None
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        restore(tmp_path / "nothing")
    save(tmp_path, 1, tree())
    with pytest.raises(CheckpointError, match=r"available steps are \[1\]"):
        restore(tmp_path, step=5)
