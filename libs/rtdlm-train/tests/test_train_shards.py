import json
from pathlib import Path

import numpy as np
import pytest

from rtdlm.train.shards import DataError, open_split, read_index, write_shards


def write(directory: Path, shard_tokens: int = 50) -> dict:
    docs = {
        "train": [np.arange(n, dtype=np.int64) % 300 for n in (10, 40, 25, 7, 60)],
        "validation": [np.full(12, 299), np.arange(9)],
    }
    return write_shards(
        directory, docs, vocab_size=300, tokenizer={"kind": "test"}, shard_tokens=shard_tokens
    )


def test_shards_round_trip_across_files_with_the_smallest_dtype(tmp_path: Path) -> None:
    index = write(tmp_path)
    assert index["dtype"] == "uint16" and len(index["splits"]["train"]) == 2
    train = open_split(tmp_path, "train")
    assert train.num_documents == 5 and train.num_tokens == 142
    for i, n in enumerate((10, 40, 25, 7, 60)):
        np.testing.assert_array_equal(train.document(i), np.arange(n) % 300)
    assert read_index(tmp_path)["vocab_size"] == 300


def test_a_truncated_or_altered_shard_is_named(tmp_path: Path) -> None:
    write(tmp_path)
    victim = tmp_path / "train-00001.tokens.npy"
    victim.write_bytes(victim.read_bytes()[:-4])
    with pytest.raises(DataError, match=r"shard file .*train-00001.tokens.npy is corrupt"):
        open_split(tmp_path, "train")
    (tmp_path / "validation-00000.offsets.npy").unlink()
    with pytest.raises(DataError, match=r"validation-00000.offsets.npy is missing"):
        open_split(tmp_path, "validation")


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (None, "no index.json in"),
        ("{not json", "is not valid JSON"),
        ('{"format": "other"}', "is not an rtdlm-token-shards index"),
        ('{"format": "rtdlm-token-shards", "splits": {"train": []}}', "has no train or validation"),
    ],
)
def test_a_bad_index_is_one_clear_error(tmp_path: Path, index: str | None, message: str) -> None:
    if index is not None:
        (tmp_path / "index.json").write_text(index)
    with pytest.raises(DataError, match=message):
        read_index(tmp_path)


def test_an_index_that_disagrees_with_its_shard_is_caught(tmp_path: Path) -> None:
    write(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    index["splits"]["train"][0]["num_documents"] += 1
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="disagrees with index.json"):
        open_split(tmp_path, "train")
