"""Reads a checkpoint's arrays without orbax's per-array machinery.

orbax's PyTree restore runs Python for every array (event loops, thread pools, metadata
trees, a device_put each), which for a train state of many small arrays costs far more than
plain reads of the same bytes; opening each array through tensorstore's zarr driver still has
a fixed cost per array. So where an item is a local OCDBT database of uncompressed zarr v2
chunks (what rtdlm-ckpt writes), its keys are listed from the database's B-tree
(`ts.ocdbt.dump`) and its files are read with plain preads, a file at a time on each core,
each chunk straight into 64-byte aligned memory that XLA:CPU adopts without a copy. A file
read whole is handed on as it is read, so the manifest check hashes its bytes while they are
still in cache instead of reading the file again. Other layouts (remote storage, compressed or
zarr3 arrays) are opened and read through tensorstore, all arrays in one batch. On a GPU each
shard is then copied to its device, so reads go in groups of at most `IN_FLIGHT` host bytes,
orbax's cap. Saving stays with orbax.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from rtdlm.ckpt import paths

PyTree = Any
ALIGNMENT = 64  # bytes: what XLA:CPU needs to use host memory in place
IN_FLIGHT = 96 * 2**30  # host bytes read at once where arrays then move to a device (orbax's)
_NAMED = 3  # arrays named in a mismatch message
_SEGMENT = 2**20  # bytes per read: a digest of them finds them still in cache
Index = tuple[slice, ...] | None  # a shard's place in its array, as jax gives it
Box = list[tuple[int, int]]  # a region of an array: start, stop per axis
Shards = dict[tuple[Any, ...], tuple[np.ndarray, ts.WriteFutures | None]]  # index -> (memory, read)
Value = bytes | tuple[str, int, int]  # a value inline in the database, or (file, offset, length)
Reads = dict[str, list[tuple[int, np.ndarray]]]  # file -> (offset, memory its bytes go to)
OnFile = Callable[[str, Iterator[memoryview]], None]  # a file read whole, its bytes in order


class Mismatch(ValueError):
    """The requested state does not fit the checkpoint: other arrays or other shapes."""


def empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """An uninitialised C-ordered array whose data starts on an ALIGNMENT boundary."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + size].view(dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Chunks:
    """An array stored as uncompressed, C-ordered zarr v2 chunks: read with plain preads."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk: tuple[int, ...]  # zarr v2 stores edge chunks whole, padded
    values: dict[tuple[int, ...], Value]  # by position in the chunk grid


@dataclasses.dataclass(frozen=True)
class Plan:
    """What read() does: each leaf with its sharding and where it lies, the leaves in groups
    under the in-flight cap, and the local files those reads cover whole."""

    leaves: list[tuple[str, jax.ShapeDtypeStruct, Chunks | ts.TensorStore]]
    places: list[dict[tuple[Any, ...], Index]]  # each leaf's shards held here
    trees: dict[str, tuple[Any, int]]  # item -> (treedef, leaf count)
    runs: list[range]
    whole: frozenset[str]


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


def plan(
    step_dir: epath.Path, targets: Mapping[str, PyTree], *, in_flight: int | None = None
) -> Plan:
    """How to read each target tree from the orbax PyTree item of its name in `step_dir`.

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
    named = []
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
        named.append((item, leaves, treedef, names, metadata))
    stored = stored_values([step_dir / item for item in targets])
    for (item, leaves, treedef, names, metadata), values in zip(named, stored, strict=True):
        sources = _sources(step_dir / item, metadata, names, context, values)
        wanted += [
            (f"{item} {name}", leaf if leaf.sharding else leaf.update(sharding=default), source)
            for name, (_, leaf), source in zip(names, leaves, sources, strict=True)
        ]
        trees[item] = (treedef, len(leaves))
    with ts.Batch() as batch:
        opening = {
            i: ts.open(source, context=context, open=True, batch=batch)
            for i, (*_, source) in enumerate(wanted)
            if isinstance(source, dict)
        }
    located = [
        (name, leaf, source if isinstance(source, Chunks) else opening[i].result())
        for i, (name, leaf, source) in enumerate(wanted)
    ]
    for name, leaf, store in located:
        if tuple(store.shape) != tuple(leaf.shape):
            raise Mismatch(
                f"{name} is {tuple(store.shape)} in the checkpoint, {leaf.shape} requested"
            )
    places = [_places(leaf) for _, leaf, _ in located]
    if in_flight is None and device.platform == "cpu":
        runs = [range(len(located))]  # read memory becomes the arrays' own: nothing to cap
    else:
        sizes = [_bytes(leaf, held) for (_, leaf, _), held in zip(located, places, strict=True)]
        runs = groups(sizes, IN_FLIGHT if in_flight is None else in_flight)
    whole = _whole(located, places) if len(runs) == 1 else frozenset()
    return Plan(located, places, trees, runs, whole)


def read(plan: Plan, *, on_file: OnFile | None = None) -> dict[str, PyTree]:
    """The planned trees. `on_file` gets each of `plan.whole` with its bytes in order, on the
    thread that reads it, each part read as it is asked for: a digest of the file then needs
    no second pass over it. It must not keep the parts."""
    restored: list[jax.Array] = []
    for group in plan.runs:
        reads: Reads = {}
        copies: list[Callable[[], Any]] = []  # after the reads: parts of chunks, casts
        with ts.Batch() as batch:
            shards = [_start(*plan.leaves[i], plan.places[i], batch, reads, copies) for i in group]
        _read_files(reads, plan.whole, on_file)
        for copy in copies:
            copy()
        restored += [
            _assemble(plan.leaves[i][1], pending) for i, pending in zip(group, shards, strict=True)
        ]
        del shards, reads, copies  # the group's host memory is freed before the next group's
    arrays = iter(restored)
    return {
        item: jax.tree_util.tree_unflatten(treedef, itertools.islice(arrays, count))
        for item, (treedef, count) in plan.trees.items()
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


Source = Chunks | dict[str, Any]  # read directly, or opened from its tensorstore spec


def _sources(
    item_dir: epath.Path,
    metadata: dict[str, Any],
    names: list[str],
    context: ts.Context,
    stored: Mapping[str, Value] | None,
) -> list[Source]:
    """Each array's chunks where all of the item's lie plain in its local OCDBT database
    (`stored`), else orbax's tensorstore spec for each."""
    if stored is not None and not metadata.get("use_zarr3") and hasattr(os, "preadv"):
        chunks = [chunked(stored, name) for name in names]  # preadv: not on Windows
        if all(chunks):
            return chunks  # type: ignore[return-value]
    info = ocp.type_handlers.ParamInfo(
        name="", parent_dir=item_dir, use_zarr3=metadata.get("use_zarr3", False), ts_context=context
    )
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=metadata.get("use_ocdbt", True))
    return [{**spec, "kvstore": {**spec["kvstore"], "path": name}} for name in names]


def stored_values(item_dirs: Sequence[epath.Path]) -> list[dict[str, Value] | None]:
    """For each item, every key of its local OCDBT database and where the value lies, from
    the newest version's B-tree; None for remote storage or an item that is not OCDBT. The
    items' trees are walked together a level at a time: each dump is a trip through
    tensorstore's threads."""
    bases = {
        i: ts.KvStore.open({"driver": "file", "path": f"{item_dir}/"}).result()
        for i, item_dir in enumerate(item_dirs)
        if not paths.is_remote(item_dir) and (item_dir / "manifest.ocdbt").exists()
    }
    manifests = {i: ts.ocdbt.dump(base) for i, base in bases.items()}
    values: dict[int, dict[str, Value]] = {}
    level: list[tuple[int, str, bytes]] = []  # item, node, the prefix of its keys
    files: dict[tuple[int, str], str] = {}  # the data files values lie in, named once
    for i, manifest in manifests.items():
        versions = manifest.result()["versions"]
        if versions:
            values[i] = {}
            root = max(versions, key=lambda version: version["generation_number"])["root"]
            if "location" in root:  # an empty database has no root node
                level.append((i, root["location"], b""))
    while level:
        nodes = [(i, prefix, ts.ocdbt.dump(bases[i], node)) for i, node, prefix in level]
        level = []
        for i, prefix, dumped in nodes:
            node = dumped.result()
            for entry in node["entries"]:
                key = prefix + entry["key"]
                if node["height"] > 0:  # a child's keys follow its subtree's prefix
                    child = prefix + entry.get("subtree_common_prefix", b"")
                    level.append((i, entry["location"], child))
                elif "inline_value" in entry:
                    values[i][key.decode()] = entry["inline_value"]
                else:  # "value:<directory>:<file>:<offset>:<length>", the file in the directory
                    where, offset, length = (
                        entry["indirect_value"].removeprefix("value:").rsplit(":", 2)
                    )
                    if (i, where) not in files:
                        files[i, where] = os.path.join(item_dirs[i], *where.split(":", 1))
                    values[i][key.decode()] = (files[i, where], int(offset), int(length))
    return [values.get(i) for i in range(len(item_dirs))]


def chunked(stored: Mapping[str, Value], name: str) -> Chunks | None:
    """The array's chunks if it is plain zarr v2 with every chunk present, else None."""
    zarray = stored.get(f"{name}/.zarray")
    if zarray is None:
        return None
    meta = _metadata(_contents(zarray))
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


@functools.lru_cache(maxsize=64)
def _metadata(zarray: bytes) -> dict[str, Any]:
    """Parsed once for all arrays alike (a model's layers share a handful of shapes)."""
    return json.loads(zarray)


def _contents(value: Value) -> bytes:
    if isinstance(value, bytes):
        return value
    path, offset, length = value
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _box(index: Index, shape: tuple[int, ...]) -> Box:
    return [(0, n) if index is None else index[d].indices(n)[:2] for d, n in enumerate(shape)]


def _positions(box: Box, chunk: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """The chunks (grid positions) that hold part of the region."""
    spans = [range(start // c, -(-stop // c)) for (start, stop), c in zip(box, chunk, strict=True)]
    return itertools.product(*spans)


def _whole(
    leaves: list[tuple[str, jax.ShapeDtypeStruct, Chunks | ts.TensorStore]],
    places: list[dict[tuple[Any, ...], Index]],
) -> frozenset[str]:
    """Files whose reads cover all but a sixteenth of them (the rest, OCDBT's B-tree nodes,
    is read beside them), with no two reads overlapping."""
    spans: dict[str, set[tuple[int, int]]] = {}
    for (_, leaf, source), held in zip(leaves, places, strict=True):
        if isinstance(source, Chunks):
            for index in held.values():
                for position in _positions(_box(index, leaf.shape), source.chunk):
                    value = source.values[position]
                    if not isinstance(value, bytes):
                        spans.setdefault(value[0], set()).add(value[1:])
    whole = []
    for path, ranges in spans.items():
        size, end, gaps = os.stat(path).st_size, 0, 0
        for offset, length in sorted(ranges):
            if offset < end:
                break  # overlapping values: not a layout this reads whole
            gaps, end = gaps + offset - end, offset + length
        else:
            if end <= size and (gaps + size - end) * 16 <= size:
                whole.append(path)
    return frozenset(whole)


def _start(
    name: str,
    leaf: jax.ShapeDtypeStruct,
    source: Chunks | ts.TensorStore,
    places: Mapping[tuple[Any, ...], Index],
    batch: ts.Batch,
    reads: Reads,
    copies: list[Callable[[], Any]],
) -> Shards:
    """Memory for each of the leaf's `places`, with what fills it: preads added to `reads`
    and the copies after them, or tensorstore reads started in `batch`; returns shard ->
    (memory, tensorstore read in flight)."""
    pending: Shards = {}
    if isinstance(source, Chunks):
        buffers: dict[tuple[int, ...], np.ndarray] = {}  # chunks that straddle shards, read once
        for key, index in places.items():
            box = _box(index, leaf.shape)
            out = empty([stop - start for start, stop in box], leaf.dtype)
            saved = out if source.dtype == leaf.dtype else np.empty(out.shape, source.dtype)
            for position in _positions(box, source.chunk):
                corner = [p * c for p, c in zip(position, source.chunk, strict=True)]
                if saved.shape == source.chunk and corner == [start for start, _ in box]:
                    _fetch(source.values[position], saved, reads)  # the chunk is the shard
                    continue
                if position not in buffers:
                    buffers[position] = np.empty(source.chunk, source.dtype)
                    _fetch(source.values[position], buffers[position], reads)
                copies.append(functools.partial(_part, saved, box, buffers[position], corner))
            if saved is not out:
                copies.append(functools.partial(np.copyto, out, saved, casting="unsafe"))
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


def _fetch(value: Value, out: np.ndarray, reads: Reads) -> None:
    """A value into `out`: copied if inline, else a pread to come."""
    if isinstance(value, bytes):
        _raw(out)[:] = np.frombuffer(value, np.uint8)
    else:
        reads.setdefault(value[0], []).append((value[1], out))


def _raw(out: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array (any dtype, 0-d too), as a flat uint8 view."""
    return out.reshape(-1).view(np.uint8)


def _part(out: np.ndarray, box: Box, chunk: np.ndarray, corner: list[int]) -> None:
    """The part of a chunk (at `corner`) inside the region `box` into `out`, that region."""
    inside = [
        (max(start, c), min(stop, c + n))
        for (start, stop), c, n in zip(box, corner, chunk.shape, strict=True)
    ]
    out[
        tuple(
            slice(lo - start, hi - start) for (lo, hi), (start, _) in zip(inside, box, strict=True)
        )
    ] = chunk[tuple(slice(lo - c, hi - c) for (lo, hi), c in zip(inside, corner, strict=True))]


def _read_files(reads: Reads, whole: frozenset[str], on_file: OnFile | None) -> None:
    """Every file's reads, the largest files first, a file at a time on each core."""
    order = sorted(reads, key=lambda path: -sum(out.nbytes for _, out in reads[path]))
    read = functools.partial(_read_file, reads=reads, whole=whole, on_file=on_file)
    workers = min(len(order), os.cpu_count() or 1)
    if workers <= 1:
        for path in order:
            read(path)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(read, order))


def _read_file(path: str, *, reads: Reads, whole: frozenset[str], on_file: OnFile | None) -> None:
    """The file's reads in file order. A file read whole is read gaps and all, and handed to
    `on_file` as it is read: each part is read when asked for, so a digest of it hashes bytes
    still in cache; what `on_file` leaves is read after it returns."""
    wanted = sorted(reads[path], key=lambda read: read[0])
    fd = os.open(path, os.O_RDONLY)
    try:
        if path in whole:  # the gaps (B-tree nodes) into scratch memory
            filled, end = [], 0
            for offset, out in wanted:
                if offset > end:
                    filled.append((end, np.empty(offset - end, np.uint8)))
                filled.append((offset, out))
                end = offset + out.nbytes
            size = os.fstat(fd).st_size
            wanted = filled + ([(end, np.empty(size - end, np.uint8))] if size > end else [])
        parts = _parts(fd, path, wanted)
        if path in whole and on_file is not None:
            on_file(path, parts)
        for _ in parts:
            pass
    finally:
        os.close(fd)


def _parts(fd: int, path: str, wanted: list[tuple[int, np.ndarray]]) -> Iterator[memoryview]:
    """Fills each memory from the file's bytes at its offset, `_SEGMENT` bytes per call,
    yielding each segment once read."""
    for offset, out in wanted:
        view = _raw(out).data
        for start in range(0, len(view), _SEGMENT):
            segment, done = view[start : start + _SEGMENT], 0
            while done < len(segment):
                count = os.preadv(fd, [segment[done:]], offset + start + done)
                if count == 0:
                    raise OSError(f"{path} ends at {offset + start + done} bytes, inside a chunk")
                done += count
            yield segment


def _assemble(leaf: jax.ShapeDtypeStruct, pending: Shards) -> jax.Array:
    """The array from its shards once read, each adopted by its device as it lies in memory."""
    for _, reading in pending.values():
        if reading is not None:
            reading.result()

    def shard(index: Index) -> np.ndarray:
        return pending[_key(index)][0]

    return jax.make_array_from_callback(leaf.shape, leaf.sharding, shard)
