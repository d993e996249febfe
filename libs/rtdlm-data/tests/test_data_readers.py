"""Every input format, written here with the real codecs (gzip, zstandard, pyarrow), read back
through prepare_shards: the documents in are the documents decoded out of the shards."""

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from rtdlm.data import BYTES, DataError, load_data
from rtdlm.data.prepare import prepare_shards
from rtdlm.data.readers import documents, files


def jsonl(texts: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


def write(path: Path, texts: list[str], field: str = "text") -> Path:
    """`texts` as the file `path` names: the format comes from its suffix."""
    name = path.name
    if name.endswith(".parquet"):
        table = pa.table({"id": list(range(len(texts))), field: texts})
        pq.write_table(table, path, row_group_size=3)  # several row groups
    elif name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress(jsonl(texts, field)))
    elif name.endswith(".jsonl.zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(jsonl(texts, field)))
    elif name.endswith(".jsonl"):
        path.write_bytes(jsonl(texts, field))
    else:
        path.mkdir()
        for i, text in enumerate(texts):
            (path / f"{i:04d}.txt").write_text(text)
    return path


def decoded(shards: Path) -> dict[str, list[str]]:
    splits, tokenizer = load_data(shards)
    return {
        name: [tokenizer.decode(corpus.document(i)) for i in range(corpus.num_documents)]
        for name, corpus in (("train", splits.train), ("validation", splits.validation))
    }


def expected(texts: list[str], every: int = 10) -> dict[str, list[str]]:
    unique = list(dict.fromkeys(t for t in texts if t))
    return {
        "train": [t for i, t in enumerate(unique) if i % every],
        "validation": [t for i, t in enumerate(unique) if not i % every],
    }


FORMATS = ["corpus.jsonl", "corpus.jsonl.gz", "corpus.jsonl.zst", "corpus.parquet", "texts"]
# Text without \r: a .txt file is read in text mode, which turns \r\n into \n.
TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r"), max_size=40)


@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=15, deadline=None)
@given(texts=st.lists(TEXT, min_size=12, max_size=30))
def test_documents_in_are_the_documents_decoded_out(
    name: str, texts: list[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    if len({t for t in texts if t}) < 10:
        texts = [*texts, *(f"filler {i}" for i in range(10))]
    root = tmp_path_factory.mktemp("corpus")
    source = write(root / name, texts)
    prepare_shards([source], root / "shards", BYTES)
    assert decoded(root / "shards") == expected(texts)


def test_inputs_mix_formats_directories_and_globs(tmp_path: Path) -> None:
    parts = [[f"part {p} document {i}" for i in range(6)] for p in range(4)]
    write(tmp_path / "a.jsonl.gz", parts[0])
    write(tmp_path / "b.jsonl.gz", parts[1])
    (tmp_path / "more").mkdir()
    write(tmp_path / "more" / "c.parquet", parts[2])
    write(tmp_path / "more" / "d.jsonl.zst", parts[3])
    (tmp_path / "more" / "notes.csv").write_text("skipped: not a document format")
    inputs = [tmp_path / "*.jsonl.gz", tmp_path / "more"]
    names = ["a.jsonl.gz", "b.jsonl.gz", "c.parquet", "d.jsonl.zst"]
    assert [p.name for p in files(inputs)] == names
    prepare_shards(inputs, tmp_path / "shards", BYTES)
    assert decoded(tmp_path / "shards") == expected([text for part in parts for text in part])


def test_another_text_field_and_null_rows(tmp_path: Path) -> None:
    texts = [f"row {i}" for i in range(12)]
    write(tmp_path / "c.jsonl.zst", texts, field="content")
    table = pa.table({"content": [*texts[:5], None, *texts[5:]]})
    pq.write_table(table, tmp_path / "c.parquet")
    assert list(documents(tmp_path / "c.jsonl.zst", "content")) == texts
    assert list(documents(tmp_path / "c.parquet", "content")) == texts  # a null is skipped


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.jsonl.gz", gzip.compress(jsonl(["x"] * 50))[:-9], r"cannot read .*a\.jsonl\.gz"),
        ("a.jsonl.zst", b"\x28\xb5\x2f\xfd not zstd", r"cannot read .*a\.jsonl\.zst"),
        ("a.jsonl.gz", b"plain text, not gzip", r"cannot read .*a\.jsonl\.gz"),
        ("a.parquet", b"PAR1 not really", r"a\.parquet is not a readable parquet file"),
        ("a.jsonl.gz", gzip.compress(b'{"body": "x"}\n'), r'a\.jsonl\.gz:1 .*"text" string'),
    ],
    ids=["truncated gzip", "bad zstd", "not gzip", "bad parquet", "wrong field"],
)
def test_a_broken_input_is_one_error_and_nothing_is_written(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare_shards([tmp_path / name], tmp_path / "shards", BYTES)
    assert not (tmp_path / "shards").exists()


def test_parquet_columns_are_checked_before_any_row(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x"], "n": [1]}), tmp_path / "a.parquet")
    with pytest.raises(
        DataError, match=r'has no column "text" \(it has body, n\): pass --text-field'
    ):
        list(documents(tmp_path / "a.parquet"))
    with pytest.raises(DataError, match=r'column "n" holds int64, not text'):
        list(documents(tmp_path / "a.parquet", "n"))


def test_a_glob_that_matches_nothing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"\*\.parquet matches no .* file or directory"):
        files([tmp_path / "*.parquet"])
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match=r"a\.csv: only .*\.parquet files can be read"):
        files([tmp_path / "a.csv"])
