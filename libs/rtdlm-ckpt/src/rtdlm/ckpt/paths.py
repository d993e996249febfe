"""Run dirs, data and artifacts live in local (or mounted) folders. A URL given as a path must
be refused: pathlib reads `s3://runs/a` as the relative folder `s3:/runs/a`, and a run would
train into it without a word."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class NotALocalPathError(argparse.ArgumentTypeError, ValueError):
    """A URL (s3://, gs://, http://, ...) where a folder or file on this machine is expected.
    An ArgumentTypeError, so `type=local_path` in argparse prints it as the usage error."""


def local_path(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path, or NotALocalPathError (one line naming the fix) if it is a URL."""
    text = os.fspath(path)
    scheme = _SCHEME.match(text)
    if scheme:
        raise NotALocalPathError(
            f"{text} is a URL, and {scheme.group(1)}:// storage is not supported: nothing was "
            "read or written; pass a local or mounted folder (a bucket mounted with s3fs or "
            "gcsfuse works)"
        )
    return Path(text)
