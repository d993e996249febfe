"""A manifest of every file in a checkpoint with its size and digest, checked before restoring.

Tensorstore does not checksum what it reads back, so a flipped bit would load silently. The
manifest is written inside orbax's temporary directory before the commit rename: a checkpoint
that is visible always has one, and one without it was not written by rtdlm-ckpt.

The digest is XXH3-128: it guards against damage (bit flips, torn or truncated files), not
against tampering, and hashes many times faster than SHA-256, so the check does not take
longer than the restore it runs beside. Manifests written with SHA-256 (format 1) still verify.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import xxhash
from etils import epath

from rtdlm.ckpt import paths

MANIFEST = "rtdlm_manifest.json"
# Orbax rewrites its step metadata (commit timestamp) after the commit, so it cannot be hashed;
# it is JSON that orbax validates when it reads it.
_UNHASHED = {MANIFEST, "_CHECKPOINT_METADATA"}


class IntegrityError(Exception):
    """A checkpoint's files differ from its manifest."""


# Manifest key -> (name in messages, hash constructor); new manifests use the first.
_DIGESTS: dict[str, tuple[str, Callable[..., Any]]] = {
    "xxh3_128": ("XXH3-128", xxhash.xxh3_128),
    "sha256": ("SHA-256", hashlib.sha256),
}
_DIGEST = next(iter(_DIGESTS))


def _digest(path: epath.Path, kind: str) -> str:
    """Local files are hashed where they lie in the page cache, mapped, which skips the copy
    into a buffer that reading them would make. Remote ones are streamed."""
    new = _DIGESTS[kind][1]
    with path.open("rb") as f:
        if not paths.is_remote(path) and os.fstat(f.fileno()).st_size:  # empty files cannot map
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return new(mapped).hexdigest()
        return hashlib.file_digest(f, new).hexdigest()


def digest(parts: Iterable[memoryview]) -> str:
    """A file's digest (XXH3-128, as new manifests hold) from its bytes in order, already in
    memory: a file restore has just read needs no second pass through the page cache."""
    hasher = xxhash.xxh3_128()
    for part in parts:
        hasher.update(part)
    return hasher.hexdigest()


def _size(path: epath.Path) -> int | None:
    """The file's size, None if it is missing; local files by one os.stat (epath's stat also
    looks up the owner's and group's names, which made up most of a small restore's check)."""
    try:
        return path.stat().length if paths.is_remote(path) else os.stat(path).st_size
    except FileNotFoundError:
        return None


def _kind(name: str, expected: dict[str, Any]) -> str:
    """The digest a manifest entry carries: XXH3-128 since format 2, SHA-256 before."""
    for kind in _DIGESTS:
        if kind in expected:
            return kind
    raise IntegrityError(f"{MANIFEST} has no digest for {name}")


def _digests(files: list[epath.Path], kinds: list[str]) -> list[str]:
    """Digests on one thread per core: both hashes release the GIL."""
    with ThreadPoolExecutor(max(1, min(len(files), os.cpu_count() or 1))) as pool:
        return list(pool.map(_digest, files, kinds))


def _files(root: epath.Path, prefix: str = "") -> list[str]:
    """Relative names of the files under `root`, listed level by level (no rglob on GCS)."""
    names: list[str] = []
    for path in sorted(root.iterdir()):
        if path.is_dir():
            names += _files(path, f"{prefix}{path.name}/")
        elif path.name not in _UNHASHED:
            names.append(prefix + path.name)
    return names


def write_manifest(step_dir: epath.Path) -> None:
    names = _files(step_dir)
    digests = _digests([step_dir / name for name in names], [_DIGEST] * len(names))
    files = {
        name: {"bytes": (step_dir / name).stat().length, _DIGEST: digest}
        for name, digest in zip(names, digests, strict=True)
    }
    (step_dir / MANIFEST).write_text(json.dumps({"format": 2, "files": files}, indent=1))


def _listed(step_dir: epath.Path, items: Collection[str] | None) -> list[tuple[str, Any]]:
    """The manifest's entries for the files of `items` (all if None), by name."""
    manifest_path = step_dir / MANIFEST
    if not manifest_path.exists():
        raise IntegrityError(f"it has no {MANIFEST}, so it was not completely written by rtdlm")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise IntegrityError(f"its {MANIFEST} is unreadable ({error})") from error
    return sorted(
        (name, expected)
        for name, expected in files.items()
        if items is None or name.split("/", 1)[0] in items
    )


def sizes(step_dir: epath.Path, items: Collection[str] | None = None) -> dict[str, int]:
    """The bytes the manifest lists for each file of `items`, by name."""
    return {name: expected["bytes"] for name, expected in _listed(step_dir, items)}


def verify(
    step_dir: epath.Path,
    items: Collection[str] | None = None,
    *,
    hashes: bool = True,
    hashed: Mapping[str, str] | None = None,
) -> None:
    """Raises IntegrityError naming the first file that is missing, truncated or altered.

    `items` limits the check to those items' subdirectories (params-only loads skip the rest).
    `hashes=False` checks presence and sizes only: no data is read, so it is cheap enough for
    naming the last good checkpoint in an error message (a full disk truncates, not flips).
    `hashed` holds XXH3-128 digests that whoever read the files computed (`digest`), by
    name: those files are not read again.
    """
    checked = _listed(step_dir, items)
    for name, expected in checked:
        size = _size(step_dir / name)
        if size is None:
            raise IntegrityError(f"{name} is missing")
        if size != expected["bytes"]:
            raise IntegrityError(f"{name} has {size} bytes, expected {expected['bytes']}")
    if not hashes:
        return
    hashed = hashed or {}
    # One thread: restore runs this beside its reads where they hash nothing themselves, and
    # XXH3 on one core outpaces the copies those reads make.
    for name, expected in checked:
        kind = _kind(name, expected)
        digest = hashed.get(name) if kind == _DIGEST else None
        if digest is None:
            digest = _digest(step_dir / name, kind)
        if digest != expected[kind]:
            raise IntegrityError(f"{name} does not match its {_DIGESTS[kind][0]} digest")
