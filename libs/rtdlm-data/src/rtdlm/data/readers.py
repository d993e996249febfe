"""Documents from files, streamed: what `prepare-data` reads.

A .txt or .md file is one document; a .jsonl file holds one document per line in its "text"
field; a directory contributes every such file under it, in sorted order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from rtdlm.data.shards import DataError

SUFFIXES = (".txt", ".md", ".jsonl")


def files(inputs: list[Path]) -> Iterator[Path]:
    """Every input file, in order. The named inputs are checked now, before anything is
    written; directories are walked lazily."""
    for path in inputs:
        if path.is_file() and path.suffix not in SUFFIXES:
            raise DataError(f"{path}: only {', '.join(SUFFIXES)} files can be read")
        if not path.exists():
            raise DataError(f"{path} does not exist")
    return _walk(inputs)


def _walk(inputs: list[Path]) -> Iterator[Path]:
    for path in inputs:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        else:
            yield path


def _decode(path: Path, data: bytes, start: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {start + error.start})") from None


def documents(path: Path) -> Iterator[str]:
    """The file's documents, one at a time: a .jsonl file is read line by line."""
    if path.suffix != ".jsonl":
        try:
            yield path.read_text(encoding="utf-8")  # text mode: \r\n becomes \n, as before
        except UnicodeDecodeError as error:
            raise DataError(f"{path} is not UTF-8 text (byte {error.start})") from None
        return
    with path.open("rb") as f:
        start = 0
        for number, raw in enumerate(f, 1):
            line = _decode(path, raw, start)
            start += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                document = record["text"]
            except (ValueError, KeyError, TypeError):
                raise DataError(
                    f'{path}:{number} is not a JSON object with a "text" string'
                ) from None
            if not isinstance(document, str):
                raise DataError(f'{path}:{number}: "text" must be a string')
            try:
                document.encode("utf-8")
            except UnicodeEncodeError:  # JSON can escape a lone surrogate (\ud800)
                raise DataError(f'{path}:{number}: "text" is not valid Unicode') from None
            yield document
