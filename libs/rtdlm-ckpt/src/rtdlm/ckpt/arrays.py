"""Reads a checkpoint's arrays without orbax's per-array machinery.

orbax's PyTree restore spends about 1 ms of Python per array (event loops, thread pools,
metadata trees, a device_put each): tiny's train state, 116 arrays in 42 MB, restored from
the page cache in 0.11 s where plain reads of the same bytes took 0.012 s. Opening each array
through tensorstore's zarr driver still cost about 0.15 ms an array. So where an item is a
local OCDBT database of uncompressed zarr v2 chunks (what rtdlm-ckpt writes), its keys are
listed from the database's B-tree (`ts.ocdbt.dump`) and each chunk is read with plain preads
straight into 64-byte aligned memory, which XLA:CPU adopts without a copy. Other layouts
(remote storage, compressed or zarr3 arrays) are opened and read through tensorstore, all
arrays in one batch. On a GPU each shard is then copied to its device, so reads go in groups
of at most `IN_FLIGHT` host bytes, orbax's cap. Saving stays with orbax.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

PyTree = Any
ALIGNMENT = 64  # bytes: what XLA:CPU needs to use host memory in place
IN_FLIGHT = 96 * 2**30  # host bytes read at once where arrays then move to a device (orbax's)
_NAMED = 3  # arrays named in a mismatch message
Index = tuple[slice, ...] | None  # a shard's place in its array, as jax gives it
Shards = dict[tuple[Any, ...], tuple[np.ndarray, ts.WriteFutures | None]]  # index -> (memory, read)
Value = bytes | tuple[str, int, int]  # a value inline in the database, or (file, offset, length)


class Mismatch(ValueError):
    """The requested state does not fit the checkpoint: other arrays or other shapes."""


def empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """An uninitialised C-ordered array whose data starts on an ALIGNMENT boundary."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + size].view(dtype).reshape(shape)


def _listed(names: set[str]) -> str:
    shown = sorted(names)[:_NAMED]
    return ", ".join(shown) + (
        f" and {len(names) - len(shown)} more" if len(names) > _NAMED else ""
    )


def _check_names(item: str, saved: set[str], requested: list[str]) -> None:
    missing, extra = set(requested) - saved, saved - set(requested)
    if missing:
        raise Mismatch(f"the checkpoint's {item} has no {_listed(missing)}")
    if extra:
        raise Mismatch(f"the checkpoint's {item} also holds {_listed(extra)}")


def _key(index: Index) -> tuple[Any, ...]:
    """A shard's index as a dict key (slices hash only from Python 3.12); None: all of it."""
    return () if index is None else tuple((s.start, s.stop, s.step) for s in index)


def read(
    step_dir: epath.Path, targets: Mapping[str, PyTree], *, in_flight: int | None = None
) -> dict[str, PyTree]:
    """Each target tree read from the orbax PyTree item of its name in `step_dir`.

    Targets are trees of jax.ShapeDtypeStruct; each leaf's sharding (the first local device
    where it has none) says which shards this process reads and where they go, so a
    checkpoint moves between device layouts. A dtype unlike the saved one is cast on reading.
    `in_flight` caps the host bytes read before they move to their devices (default
    `IN_FLIGHT`; on CPU none, since the read memory becomes the arrays' own).
    Raises Mismatch when a tree's arrays or shapes are not the checkpoint's.
    """
    context = ocp.type_handlers.get_ts_context()
    device = jax.local_devices()[0]
    default = jax.sharding.SingleDeviceSharding(device)
    wanted: list[tuple[str, jax.ShapeDtypeStruct, Source]] = []  # name, leaf, where it lies
    trees = {}
    for item, target in targets.items():
        leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
        names = [".".join(ocp.tree.str_keypath(path)) for path, _ in leaves]
        metadata = json.loads((step_dir / item / "_METADATA").read_text())
        saved = {
            ".".join(str(key["key"]) for key in entry["key_metadata"])
            for entry in metadata["tree_metadata"].values()
            if not entry["value_metadata"].get("skip_deserialize")
        }
        _check_names(item, saved, names)
        sources = _sources(step_dir / item, metadata, names, context)
        wanted += [
            (f"{item} {name}", leaf.update(sharding=leaf.sharding or default), source)
            for name, (_, leaf), source in zip(names, leaves, sources, strict=True)
        ]
        trees[item] = (treedef, len(leaves))
    with ts.Batch() as batch:
        opening = {
            i: ts.open(source, context=context, open=True, batch=batch)
            for i, (*_, source) in enumerate(wanted)
            if isinstance(source, dict)
        }
    readers = [
        source if isinstance(source, Chunks) else opening[i].result()
        for i, (*_, source) in enumerate(wanted)
    ]
    places = [_places(leaf) for _, leaf, _ in wanted]
    if in_flight is None and device.platform == "cpu":
        runs = [range(len(wanted))]  # read memory becomes the arrays' own: nothing to cap
    else:
        sizes = [_bytes(leaf, held) for (_, leaf, _), held in zip(wanted, places, strict=True)]
        runs = groups(sizes, IN_FLIGHT if in_flight is None else in_flight)
    restored: list[jax.Array] = []
    with _Files() as files:
        for group in runs:
            with ts.Batch() as batch:
                shards = [
                    _start(*wanted[i][:2], readers[i], places[i], batch, files) for i in group
                ]
            restored += [
                _assemble(wanted[i][1], pending) for i, pending in zip(group, shards, strict=True)
            ]
            del shards  # the group's host memory is freed before the next group's is taken
    arrays = iter(restored)
    return {
        item: jax.tree_util.tree_unflatten(treedef, itertools.islice(arrays, count))
        for item, (treedef, count) in trees.items()
    }


def groups(sizes: Sequence[int], limit: int) -> list[range]:
    """Consecutive runs of indices whose sizes sum to at most `limit`; a larger size alone."""
    runs, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            runs.append(range(start, i))
            start, total = i, 0
        total += size
    return runs + ([range(start, len(sizes))] if sizes else [])


def _places(leaf: jax.ShapeDtypeStruct) -> dict[tuple[Any, ...], Index]:
    """The distinct shards this process holds of the leaf (replicas share one read), by key."""
    indices = leaf.sharding.addressable_devices_indices_map(leaf.shape).values()
    return {_key(index): index for index in indices}


def _bytes(leaf: jax.ShapeDtypeStruct, places: Mapping[tuple[Any, ...], Index]) -> int:
    """Host bytes of those shards."""
    shard = math.prod(leaf.sharding.shard_shape(leaf.shape))
    return len(places) * shard * np.dtype(leaf.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Chunks:
    """An array stored as uncompressed, C-ordered zarr v2 chunks: read with plain preads."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk: tuple[int, ...]  # zarr v2 stores edge chunks whole, padded
    values: dict[tuple[int, ...], Value]  # by position in the chunk grid


Source = Chunks | dict[str, Any]  # read directly, or opened from its tensorstore spec


def _sources(
    item_dir: epath.Path, metadata: dict[str, Any], names: list[str], context: ts.Context
) -> list[Source]:
    """Each array's chunks where all of the item's lie plain in a local OCDBT database,
    else orbax's tensorstore spec for each."""
    stored = None if metadata.get("use_zarr3") else stored_values(item_dir)
    if stored is not None:
        chunks = [chunked(stored, name) for name in names]
        if all(chunks):
            return chunks  # type: ignore[return-value]
    info = ocp.type_handlers.ParamInfo(
        name="", parent_dir=item_dir, use_zarr3=metadata.get("use_zarr3", False), ts_context=context
    )
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=metadata.get("use_ocdbt", True))
    return [{**spec, "kvstore": {**spec["kvstore"], "path": name}} for name in names]


def stored_values(item_dir: epath.Path) -> dict[str, Value] | None:
    """Every key of the item's local OCDBT database and where its value lies, from the
    newest version's B-tree; None for remote storage or an item that is not OCDBT."""
    if "://" in str(item_dir) or not (item_dir / "manifest.ocdbt").exists():
        return None
    base = ts.KvStore.open({"driver": "file", "path": f"{item_dir}/"}).result()
    versions = ts.ocdbt.dump(base).result()["versions"]
    if not versions:
        return None
    root = max(versions, key=lambda version: version["generation_number"])["root"]
    values: dict[str, Value] = {}
    if "location" in root:  # an empty database has no root node
        _collect(base, root["location"], b"", os.fspath(item_dir), values)
    return values


def _collect(
    base: ts.KvStore, location: str, prefix: bytes, item_dir: str, values: dict[str, Value]
) -> None:
    """Adds the keys under one B-tree node; a child's keys follow its subtree's prefix."""
    node = ts.ocdbt.dump(base, location).result()
    for entry in node["entries"]:
        if node["height"] > 0:
            child = prefix + entry.get("subtree_common_prefix", b"")
            _collect(base, entry["location"], child, item_dir, values)
        elif "inline_value" in entry:
            values[(prefix + entry["key"]).decode()] = entry["inline_value"]
        else:  # "value:<directory>:<file>:<offset>:<length>", the file within the directory
            where, offset, length = entry["indirect_value"].removeprefix("value:").rsplit(":", 2)
            directory, file = where.split(":", 1)
            path = os.path.join(item_dir, directory, file)
            values[(prefix + entry["key"]).decode()] = (path, int(offset), int(length))


def chunked(stored: Mapping[str, Value], name: str) -> Chunks | None:
    """The array's chunks if it is plain zarr v2 with every chunk present, else None."""
    zarray = stored.get(f"{name}/.zarray")
    if zarray is None:
        return None
    meta = json.loads(_contents(zarray))
    plain = (2, None, None, "C")
    if (meta["zarr_format"], meta["compressor"], meta["filters"], meta["order"]) != plain:
        return None
    try:
        dtype = np.dtype(meta["dtype"])
    except TypeError:  # a structured dtype
        return None
    if dtype.byteorder == ">" or dtype.hasobject:
        return None
    shape, chunk = tuple(meta["shape"]), tuple(meta["chunks"])
    separator = meta.get("dimension_separator", ".")
    size = math.prod(chunk) * dtype.itemsize
    values = {}
    for position in itertools.product(
        *(range(-(-n // c)) for n, c in zip(shape, chunk, strict=True))
    ):
        value = stored.get(f"{name}/{separator.join(map(str, position)) or '0'}")
        if value is None or (len(value) if isinstance(value, bytes) else value[2]) != size:
            return None  # tensorstore fills a missing chunk, or names the damage
        values[position] = value
    return Chunks(shape, dtype, chunk, values)


def _contents(value: Value) -> bytes:
    if isinstance(value, bytes):
        return value
    path, offset, length = value
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


class _Files:
    """File descriptors opened once per restore, closed at its end."""

    def __enter__(self) -> _Files:
        self.open: dict[str, int] = {}
        return self

    def __exit__(self, *_: object) -> None:
        for fd in self.open.values():
            os.close(fd)

    def pread(self, value: Value, out: np.ndarray) -> None:
        """The value's bytes into `out`, a C-contiguous array of exactly that many bytes."""
        target = out.reshape(-1).view(np.uint8)
        if isinstance(value, bytes):
            target[:] = np.frombuffer(value, np.uint8)
            return
        path, offset, length = value
        if path not in self.open:
            self.open[path] = os.open(path, os.O_RDONLY)
        done = 0
        while done < length:  # Linux reads at most 2 GiB per call
            count = os.preadv(self.open[path], [target[done:].data], offset + done)
            if count == 0:
                raise OSError(f"{path} ends at {offset + done} bytes, inside a chunk")
            done += count


def _start(
    name: str,
    leaf: jax.ShapeDtypeStruct,
    source: Chunks | ts.TensorStore,
    places: Mapping[tuple[Any, ...], Index],
    batch: ts.Batch,
    files: _Files,
) -> Shards:
    """Reads each of the leaf's `places`, or starts reading them in tensorstore's `batch`;
    returns shard -> (memory, read still in flight)."""
    if tuple(source.shape) != tuple(leaf.shape):
        raise Mismatch(f"{name} is {tuple(source.shape)} in the checkpoint, {leaf.shape} requested")
    pending: Shards = {}
    if isinstance(source, Chunks):
        for key, index in places.items():
            box = [
                (0, n) if index is None else index[d].indices(n)[:2]
                for d, n in enumerate(leaf.shape)
            ]
            out = empty([stop - start for start, stop in box], leaf.dtype)
            saved = out if source.dtype == leaf.dtype else np.empty(out.shape, source.dtype)
            _fill(saved, box, source, files)
            if saved is not out:
                out[...] = saved
            pending[key] = (out, None)
        return pending
    store = source
    if store.dtype.numpy_dtype != leaf.dtype:
        store = ts.cast(store, ts.dtype(leaf.dtype))
    for key, index in places.items():
        region = store if index is None else store[index]
        out = empty(region.shape, leaf.dtype)
        pending[key] = (out, ts.array(out).write(region, batch=batch))
    return pending


def _fill(out: np.ndarray, box: list[tuple[int, int]], source: Chunks, files: _Files) -> None:
    """The region `box` (start, stop per axis) of the array into `out`: a chunk that is the
    region is read in place, others through a buffer for the part inside the region."""
    spans = [
        range(start // c, -(-stop // c))
        for (start, stop), c in zip(box, source.chunk, strict=True)
    ]
    for position in itertools.product(*spans):
        corner = [p * c for p, c in zip(position, source.chunk, strict=True)]
        if out.shape == source.chunk and all(
            c == start for c, (start, _) in zip(corner, box, strict=True)
        ):
            files.pread(source.values[position], out)
            continue
        whole = np.empty(source.chunk, source.dtype)
        files.pread(source.values[position], whole)
        inside = [
            (max(start, c), min(stop, c + n))
            for (start, stop), c, n in zip(box, corner, source.chunk, strict=True)
        ]
        out[
            tuple(
                slice(lo - start, hi - start)
                for (lo, hi), (start, _) in zip(inside, box, strict=True)
            )
        ] = whole[tuple(slice(lo - c, hi - c) for (lo, hi), c in zip(inside, corner, strict=True))]


def _assemble(leaf: jax.ShapeDtypeStruct, pending: Shards) -> jax.Array:
    """The array from its shards once read, each adopted by its device as it lies in memory."""
    for _, reading in pending.values():
        if reading is not None:
            reading.result()

    def shard(index: Index) -> np.ndarray:
        return pending[_key(index)][0]

    return jax.make_array_from_callback(leaf.shape, leaf.sharding, shard)
