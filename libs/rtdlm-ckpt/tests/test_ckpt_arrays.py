import itertools
import json
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from etils import epath
from hypothesis import given, settings
from hypothesis import strategies as st

from rtdlm.ckpt import CheckpointError, CheckpointManager, arrays
from rtdlm.ckpt import manager as ckpt_manager

DTYPES = [np.float32, jnp.bfloat16, np.int32]


@st.composite
def saved_trees(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """A tree of arrays (scalars included) and the dtypes it is asked back in."""
    tree, dtypes = {}, {}
    for i in range(draw(st.integers(1, 4))):
        shape = tuple(draw(st.lists(st.integers(1, 40), max_size=3)))
        saved = draw(st.sampled_from(DTYPES))
        values = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) * 0.75 - 3
        tree[f"a{i}"] = jnp.asarray(values, saved)
        dtypes[f"a{i}"] = draw(st.sampled_from([saved, *DTYPES]))
    return tree, dtypes


@settings(max_examples=15, deadline=None)
@given(saved_trees())
def test_arrays_come_back_cast_as_asked_in_memory_jax_adopts(
    case: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    tree, dtypes = case
    read_into: list[int] = []
    empty = arrays.empty

    def recording(shape: Any, dtype: Any) -> np.ndarray:
        out = empty(shape, dtype)
        read_into.append(out.ctypes.data)
        return out

    with (
        pytest.MonkeyPatch.context() as patch,
        tempfile.TemporaryDirectory() as directory,
        CheckpointManager(directory) as manager,
    ):
        manager.save(1, params=tree)
        manager.wait()
        patch.setattr(arrays, "empty", recording)
        target = {k: jax.ShapeDtypeStruct(v.shape, dtypes[k]) for k, v in tree.items()}
        restored = manager.restore(1, params=target).params
    for name, value in tree.items():
        expected = np.asarray(value).astype(dtypes[name])  # as numpy casts
        assert restored[name].dtype == expected.dtype
        np.testing.assert_array_equal(np.asarray(restored[name]), expected)
    pointers = [a.unsafe_buffer_pointer() for a in jax.tree.leaves(restored)]
    assert sorted(pointers) == sorted(read_into)  # no copy after the read
    assert all(p % arrays.ALIGNMENT == 0 for p in pointers)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"w": (4, 3)}, r"the checkpoint's params also holds b$"),
        ({"w": (4, 3), "b": (3,), "c": (2,)}, r"the checkpoint's params has no c$"),
        ({"w": (4, 2), "b": (3,)}, r"params w is \(4, 3\) in the checkpoint, \(4, 2\) requested"),
    ],
)
def test_a_tree_unlike_the_saved_one_is_named(
    tmp_path: Path, target: dict[str, tuple[int, ...]], message: str
) -> None:
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params={"w": jnp.ones((4, 3)), "b": jnp.zeros(3)})
    abstract = {k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, shape in target.items()}
    with pytest.raises(arrays.Mismatch, match=message):
        arrays.plan(epath.Path(tmp_path / "1"), {"params": abstract})


def test_many_missing_arrays_are_counted_not_listed(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params={"w": jnp.ones(3)})
    abstract = {f"x{i}": jax.ShapeDtypeStruct((3,), jnp.float32) for i in range(6)}
    abstract["w"] = jax.ShapeDtypeStruct((3,), jnp.float32)
    with pytest.raises(arrays.Mismatch, match=r"has no x0, x1, x2 and 3 more$"):
        arrays.plan(epath.Path(tmp_path / "1"), {"params": abstract})


def test_trees_with_python_scalars_restore_through_orbax_beside_array_trees(
    tmp_path: Path,
) -> None:
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    opt_state = {"m": jnp.ones(3), "count": 7, "rate": 0.5}
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=params, opt_state=opt_state)
        restored = manager.restore(1, params=params, opt_state=opt_state)
        assert restored.opt_state is not None
        assert restored.opt_state["count"] == 7 and restored.opt_state["rate"] == 0.5
        np.testing.assert_array_equal(restored.opt_state["m"], opt_state["m"])
        np.testing.assert_array_equal(restored.params["w"], params["w"])
        with pytest.raises(CheckpointError, match="does not fit the requested state"):
            manager.restore(1, params=params, opt_state={**opt_state, "extra": 1})


def test_checkpoints_written_compressed_still_restore(tmp_path: Path) -> None:
    params = {"w": jnp.arange(4096.0).reshape(64, 64), "b": jnp.zeros(64)}
    with pytest.MonkeyPatch.context() as patch:  # as rtdlm-ckpt wrote them before 2026-12
        patch.setattr(ckpt_manager, "_array_handler", lambda: ocp.PyTreeCheckpointHandler())
        with CheckpointManager(tmp_path) as saving:
            saving.save(1, params=params)
    kvstore = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{tmp_path}/1/params/"}).result()
    zarray = json.loads(kvstore.read(b"w/.zarray").result().value)
    assert zarray["compressor"] is not None
    with CheckpointManager(tmp_path) as restoring:
        restored = restoring.restore(1, params=params).params
    np.testing.assert_array_equal(restored["w"], params["w"])


@given(st.lists(st.integers(0, 100), max_size=30), st.integers(1, 150))
def test_groups_are_consecutive_runs_under_the_limit(sizes: list[int], limit: int) -> None:
    runs = arrays.groups(sizes, limit)
    assert [i for run in runs for i in run] == list(range(len(sizes)))
    for run in runs:
        assert len(run) > 0
        assert len(run) == 1 or sum(sizes[i] for i in run) <= limit
    for run, after in itertools.pairwise(runs):  # a run ends only where the next won't fit
        assert sum(sizes[i] for i in run) + sizes[after[0]] > limit


def test_reads_capped_in_flight_go_in_groups_and_return_the_same_arrays(tmp_path: Path) -> None:
    # 160, 320, 480, 640 and 800 bytes under a limit of 641: w0 and w1 together, the rest alone.
    tree = {f"w{i}": jnp.arange(40 * (i + 1), dtype=jnp.float32).reshape(-1, 4) for i in range(5)}
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=tree)
    target = {"params": ckpt_manager._as_target(tree)}
    events: list[str] = []
    start, assemble = arrays._start, arrays._assemble

    def starting(*args: Any) -> Any:
        events.append("read")
        return start(*args)

    def assembling(*args: Any) -> Any:
        events.append("place")
        return assemble(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(arrays, "_start", starting)
        patch.setattr(arrays, "_assemble", assembling)
        capped = arrays.read(arrays.plan(epath.Path(tmp_path) / "1", target, in_flight=641))
    assert " ".join(events) == "read read place place" + " read place" * 3
    for name, value in tree.items():
        np.testing.assert_array_equal(capped["params"][name], value)


@st.composite
def chunked_regions(draw: st.DrawFn) -> tuple[np.ndarray, list[int], list[tuple[int, int]]]:
    """An array, a zarr chunk shape (edge chunks padded) and a region of the array."""
    shape = draw(st.lists(st.integers(1, 9), max_size=3))
    chunk = [draw(st.integers(1, n + 2)) for n in shape]
    dtype = draw(st.sampled_from(DTYPES))
    box = [tuple(sorted(draw(st.lists(st.integers(0, n), min_size=2, max_size=2)))) for n in shape]
    box = [
        (start, stop) if start < stop else (0, n)
        for (start, stop), n in zip(box, shape, strict=False)
    ]
    values = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) * 0.5 - 7
    return np.asarray(values).astype(dtype), chunk, box  # type: ignore[return-value]


@settings(max_examples=30, deadline=None)
@given(chunked_regions())
def test_plain_chunks_read_with_preads_give_any_region_of_any_chunking(
    case: tuple[np.ndarray, list[int], list[tuple[int, int]]],
) -> None:
    values, chunk, box = case
    dtype = "bfloat16" if values.dtype == jnp.bfloat16 else values.dtype.str
    handed: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as directory:
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "ocdbt", "base": f"file://{directory}/", "path": "a"},
            "metadata": {
                "shape": values.shape,
                "chunks": chunk,
                "dtype": dtype,
                "compressor": None,
            },
        }
        ts.open(spec, create=True).result().write(values).result()
        (stored,) = arrays.stored_values([epath.Path(directory)])
        assert stored is not None
        assert {type(value) for value in stored.values()} <= {bytes, tuple}
        source = arrays.chunked(stored, "a")
        assert source is not None and source.chunk == tuple(chunk)
        leaf = jax.ShapeDtypeStruct(values.shape, values.dtype)
        places: dict[tuple[Any, ...], arrays.Index] = {(): tuple(slice(*s) for s in box)}
        whole = arrays._whole([("a", leaf, source)], [places])
        reads: arrays.Reads = {}
        copies: list[Any] = []
        with ts.Batch() as batch:
            shards = arrays._start("a", leaf, source, places, batch, reads, copies)
        arrays._read_files(reads, whole, lambda path, parts: handed.update({path: b"".join(parts)}))
        for copy in copies:
            copy()
        on_disk = {path: Path(path).read_bytes() for path in whole}
    np.testing.assert_array_equal(shards[()][0], values[tuple(slice(*span) for span in box)])
    assert handed == on_disk  # each file read whole went on with exactly its bytes


def test_compressed_arrays_and_missing_chunks_are_left_to_tensorstore(tmp_path: Path) -> None:
    store = ts.open(
        {
            "driver": "zarr",
            "kvstore": {"driver": "ocdbt", "base": f"file://{tmp_path}/", "path": "a"},
            "metadata": {"shape": [4, 4], "chunks": [2, 4], "dtype": "<f4"},  # blosc by default
        },
        create=True,
    ).result()
    store[:2].write(np.ones((2, 4), np.float32)).result()
    (stored,) = arrays.stored_values([epath.Path(tmp_path)])
    assert stored is not None and arrays.chunked(stored, "a") is None
    assert arrays.stored_values([epath.Path(tmp_path) / "elsewhere"]) == [None]


def test_files_read_whole_are_handed_on_with_their_bytes(tmp_path: Path) -> None:
    tree = {"w": jnp.arange(4096.0).reshape(64, 64), "b": jnp.ones(300), "s": jnp.int32(3)}
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=tree)
    plan = arrays.plan(epath.Path(tmp_path) / "1", {"params": ckpt_manager._as_target(tree)})
    handed: dict[str, bytes] = {}
    restored = arrays.read(plan, on_file=lambda path, parts: handed.update({path: b"".join(parts)}))
    assert plan.whole and set(handed) == set(plan.whole)
    assert all(Path(path).read_bytes() == data for path, data in handed.items())
    for name, value in tree.items():
        np.testing.assert_array_equal(restored["params"][name], value)
