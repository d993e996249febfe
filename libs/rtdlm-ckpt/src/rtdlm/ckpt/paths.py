"""Where run dirs, checkpoints and data may live: a local (or mounted) folder, or a prefix in an
S3 or GCS bucket, which orbax and tensorstore write to directly. Any other URL must be refused:
pathlib reads `hdfs://runs/a` as the relative folder `hdfs:/runs/a`, and a run would train into
it without a word."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import fsspec.config  # type: ignore[import-untyped]
from etils import epath

# s3fs and gcsfs keep every folder listing for the life of the process unless told otherwise;
# tensorstore writes behind their backs, and other processes write too, so a cached listing
# would miss committed steps
for _protocol in ("s3", "gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
SCHEMES = ("s3", "gs")  # object storage: epath (fsspec) for small files, tensorstore for arrays


class StoragePathError(argparse.ArgumentTypeError, ValueError):
    """A path that names no storage rtdlm can use. An ArgumentTypeError, so `type=` in argparse
    prints it as the usage error."""


class NotALocalPathError(StoragePathError):
    """A URL (s3://, gs://, http://, ...) where a folder or file on this machine is expected."""


def local_path(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path, or NotALocalPathError (one line naming the fix) if it is a URL."""
    text = os.fspath(path)
    scheme = _SCHEME.match(text)
    if scheme:
        raise NotALocalPathError(
            f"{text} is a URL, and this takes a folder on this machine: nothing was read or "
            "written; pass a local or mounted folder (a bucket mounted with s3fs or gcsfuse works)"
        )
    return Path(text)


def storage_path(path: str | os.PathLike[str]) -> epath.Path:
    """A local path (made absolute: tensorstore needs it) or `s3://bucket/prefix` /
    `gs://bucket/prefix`; other URLs, and a bucket without a prefix, raise StoragePathError."""
    text = os.fspath(path)
    scheme = _SCHEME.match(text)
    if not scheme:
        return epath.Path(os.path.abspath(text))
    name = scheme.group(1)
    if name not in SCHEMES:
        raise StoragePathError(
            f"{text} is a URL, and {name}:// storage is not supported: nothing was read or "
            "written; pass a local or mounted folder, s3://bucket/prefix or gs://bucket/prefix"
        )
    bucket, _, prefix = text[scheme.end() :].partition("/")
    prefix = prefix.strip("/")
    if not bucket or not prefix:
        raise StoragePathError(
            f"{text} names no folder in a bucket: nothing was read or written; pass "
            f"{name}://bucket/prefix"
        )
    return epath.Path(f"{name}://{bucket}/{prefix}")


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is on object storage (s3://, gs://), where nothing renames atomically."""
    scheme = _SCHEME.match(os.fspath(path))
    return scheme is not None and scheme.group(1) in SCHEMES


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the standard AWS variables (MinIO, Ceph, a test server);
    boto reads them, tensorstore's s3 driver needs it in its spec."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def kvstore(url: str | os.PathLike[str]) -> dict[str, Any]:
    """tensorstore's kvstore spec for an s3:// or gs:// folder, credentials from the standard
    environment."""
    text = os.fspath(url)
    name, _, rest = text.partition("://")
    bucket, _, prefix = rest.partition("/")
    if name == "gs":
        return {"driver": "gcs", "bucket": bucket, "path": prefix}
    if name != "s3":
        raise StoragePathError(f"{text} is not on s3:// or gs://")
    # tensorstore's default retries go on for many minutes; a request that cannot reach the
    # bucket for half a minute fails instead, and the run says so (RTDLM_S3_RETRIES: attempts)
    attempts = int(os.environ.get("RTDLM_S3_RETRIES") or 6)
    retries = {"max_retries": attempts, "initial_delay": "1s", "max_delay": "10s"}
    spec: dict[str, Any] = {
        "driver": "s3",
        "bucket": bucket,
        "path": prefix,
        "s3_request_retries": retries,
    }
    if endpoint := s3_endpoint():
        spec["endpoint"] = endpoint
    if region := os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
        spec["aws_region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):  # else the default chain: profile, web identity, IMDS
        spec["aws_credentials"] = {"type": "environment"}
    return spec


def upload(local: str | os.PathLike[str], target: epath.Path) -> None:
    """Copies the folder `local` into `target` (on object storage: there is no rename to make
    it whole at once, so readers look for the file written last, as they would anyway)."""
    root = Path(local)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            (target / path.relative_to(root).as_posix()).write_bytes(path.read_bytes())


def download(source: epath.Path, local: str | os.PathLike[str]) -> Path:
    """Copies the small folder `source` (a run's held-out data, say) into `local`."""
    root = Path(local)
    root.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_dir():
            download(path, root / path.name)
        else:
            (root / path.name).write_bytes(path.read_bytes())
    return root
