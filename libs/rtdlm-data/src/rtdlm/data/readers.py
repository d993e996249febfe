"""Documents from files, streamed: what `prepare-data` reads.

A .txt or .md file is one document. A .jsonl file (plain, .jsonl.gz or .jsonl.zst) holds one
document per line, in a JSON object's text field; a .parquet file one per row of its text
column, read a batch of rows at a time. Inputs are files, directories (every such file under
them, in sorted order) or glob patterns, in any mix. Nothing holds more than one document, a
line or a batch of parquet rows, so memory does not grow with the corpus.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from rtdlm.data.shards import DataError

SUFFIXES = (".txt", ".md", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
PARQUET_ROWS = 1024  # rows per batch read from a parquet file


def readable(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def files(inputs: list[Path]) -> Iterator[Path]:
    """Every input file, in order. The named inputs are checked now, before anything is
    written (a glob must match something); directories are walked lazily."""
    expanded: list[Path] = []
    for path in inputs:
        if glob.has_magic(str(path)):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            matches = [p for p in matches if p.is_dir() or readable(p)]
            if not matches:
                raise DataError(f"{path} matches no {', '.join(SUFFIXES)} file or directory")
            expanded += matches
            continue
        if not path.exists():
            raise DataError(f"{path} does not exist")
        if path.is_file() and not readable(path):
            raise DataError(f"{path}: only {', '.join(SUFFIXES)} files can be read")
        expanded.append(path)
    return _walk(expanded)


def _walk(inputs: list[Path]) -> Iterator[Path]:
    for path in inputs:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if readable(p) and p.is_file())
        else:
            yield path


def _decode(path: Path, data: bytes, start: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {start + error.start})") from None


def _checked(path: Path, where: str, document: object, field: str) -> str:
    if not isinstance(document, str):
        raise DataError(f'{path}{where}: "{field}" must be a string')
    try:
        document.encode("utf-8")
    except UnicodeEncodeError:  # JSON can escape a lone surrogate (\ud800)
        raise DataError(f'{path}{where}: "{field}" is not valid Unicode') from None
    return document


def _open_lines(path: Path) -> IO[bytes]:
    """The file's uncompressed bytes as a stream, decompressed as it is read."""
    if path.name.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(path, "rb"))
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb")))
    return path.open("rb")


def _jsonl(path: Path, field: str) -> Iterator[str]:
    unreadable: tuple[type[Exception], ...] = (OSError, EOFError)  # gzip's errors among them
    if path.name.endswith(".zst"):
        import zstandard

        unreadable += (zstandard.ZstdError,)
    try:
        with _open_lines(path) as f:
            start = 0
            for number, raw in enumerate(f, 1):
                line = _decode(path, raw, start)
                start += len(raw)
                if not line.strip():
                    continue
                try:
                    document = json.loads(line)[field]
                except (ValueError, KeyError, TypeError):
                    raise DataError(
                        f'{path}:{number} is not a JSON object with a "{field}" string '
                        "(--text-field names another)"
                    ) from None
                yield _checked(path, f":{number}", document, field)
    except unreadable as error:
        raise DataError(f"cannot read {path} ({error}): is it complete?") from None


def _parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{path} is not a readable parquet file ({error})") from None
    with parquet:
        names = parquet.schema_arrow.names
        if field not in names:
            raise DataError(
                f'{path} has no column "{field}" (it has {", ".join(names)}): pass '
                "--text-field NAME"
            )
        kind = parquet.schema_arrow.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f'{path}: column "{field}" holds {kind}, not text')
        row = 0
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_ROWS, columns=[field]):
                for document in batch.column(0).to_pylist():
                    row += 1
                    if document is not None:  # a null is an empty document
                        yield document
        except pa.ArrowException as error:
            raise DataError(f"{path} is corrupt after row {row} ({error})") from None


def documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The file's documents, one at a time."""
    name = path.name
    if name.endswith(".parquet"):
        yield from _parquet(path, text_field)
    elif name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        yield from _jsonl(path, text_field)
    else:
        try:
            yield path.read_text(encoding="utf-8")  # text mode: \r\n becomes \n, as before
        except UnicodeDecodeError as error:
            raise DataError(f"{path} is not UTF-8 text (byte {error.start})") from None
