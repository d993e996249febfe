import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from hypothesis import given, settings
from hypothesis import strategies as st
from orbax.checkpoint._src.serialization import serialization

from rtdlm.ckpt import CheckpointManager, aligned


def read(
    reader: Callable[..., Any],
    stored: np.ndarray,
    index: tuple[slice, ...],
    shape: tuple[int, ...],
    dtype: Any,
) -> np.ndarray:
    """One shard read as orbax's non-strict path asks for it (the strict path is its subset)."""
    t = ts.array(stored)
    requested = ts.IndexTransform(input_shape=shape)[index].domain
    return asyncio.run(
        reader(
            t,
            new_shard_shape=requested.shape,
            dtype=dtype,
            requested_domain=requested,
            restricted_domain=t.domain.intersect(requested),
        )
    )


@st.composite
def shard_reads(draw: st.DrawFn) -> tuple[np.ndarray, tuple[slice, ...], tuple[int, ...], Any]:
    """A stored array, the (possibly larger) shape asked for, one shard of it and a dtype."""
    stored_shape = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))
    shape = [n + draw(st.sampled_from([0, 0, 2])) for n in stored_shape]  # sometimes padded
    index = []
    for n in shape:
        start = draw(st.integers(0, n - 1))
        index.append(slice(start, draw(st.integers(start + 1, n))))
    stored = np.arange(np.prod(stored_shape), dtype=np.float32).reshape(stored_shape) + 0.5
    dtype = draw(st.sampled_from([None, np.float32, jnp.bfloat16, np.int32]))
    return stored, tuple(index), tuple(shape), dtype


@settings(max_examples=40, deadline=None)
@given(shard_reads())
def test_read_shard_returns_what_orbax_does_in_aligned_memory(
    case: tuple[np.ndarray, tuple[slice, ...], tuple[int, ...], Any],
) -> None:
    stored, index, shape, dtype = case
    assert aligned.orbax_read_shard is not None  # orbax still has the reader replaced
    expected = read(aligned.orbax_read_shard, stored, index, shape, dtype)
    got = read(aligned.read_shard, stored, index, shape, dtype)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)  # padding included: zeros, as orbax's
    assert got.ctypes.data % aligned.ALIGNMENT == 0


def test_managers_install_it_in_orbax(tmp_path: Path) -> None:
    CheckpointManager(tmp_path).close()
    assert serialization._read_shard is aligned.read_shard  # fails if orbax renames it


def test_restored_arrays_are_the_memory_read_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The point of it: jax adopts each shard as read, with no copy."""
    read_into: list[int] = []

    async def recording(t: ts.TensorStore, **kwargs: Any) -> np.ndarray:
        shard = await aligned.read_shard(t, **kwargs)
        read_into.append(shard.ctypes.data)
        return shard

    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (256, 256)), "b": jnp.ones(256)}
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=params)
        manager.wait()
        monkeypatch.setattr(serialization, "_read_shard", recording)
        restored = manager.restore(1).params
    np.testing.assert_array_equal(restored["w"], params["w"])
    assert sorted(a.unsafe_buffer_pointer() for a in jax.tree.leaves(restored)) == sorted(read_into)
