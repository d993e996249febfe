import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rtdlm.data import shards
from rtdlm.data.shards import (
    DataError,
    ShardWriter,
    corpus_from_documents,
    open_split,
    read_index,
    verify,
    write_index,
    write_shards,
)


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


# Start-up cost: opening reads headers and offsets only; SHA-256s are checked lazily, once per
# shard, before the shard's first document is returned (and all at once by verify).

TRAIN_LENGTHS = (10, 40, 25, 7, 60)  # shard_tokens=50: train-00000 holds documents 0-1, -00001 2-4


def flip_a_token_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the data, so the size and header stay intact
    path.write_bytes(bytes(data))


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the size of every buffer the lazy check hashes (slowly, to widen races)."""
    calls: list[int] = []
    real = shards._sha256

    def counting(data: Any) -> str:
        calls.append(len(data))
        time.sleep(0.02)
        return real(data)

    monkeypatch.setattr(shards, "_sha256", counting)
    return calls


def test_open_hashes_nothing_and_a_flipped_byte_fails_before_its_shard_is_read(
    tmp_path: Path, hashes: list[int]
) -> None:
    write(tmp_path)
    flip_a_token_byte(tmp_path / "train-00001.tokens.npy")
    train = open_split(tmp_path, "train")  # sizes and headers are fine: no data is read
    assert hashes == [] and train.num_documents == 5
    np.testing.assert_array_equal(train.document(1), np.arange(40))  # train-00000 is intact
    assert len(hashes) == 2  # its tokens and offsets files, once
    for doc in (2, 4, 3):  # every document of the corrupt shard, every time
        with pytest.raises(DataError, match=r"shard file .*train-00001.tokens.npy is corrupt"):
            train.document(doc)
    assert len(hashes) == 2 + 1  # tokens mismatched (offsets not needed), hashed once
    np.testing.assert_array_equal(train.document(0), np.arange(10))
    assert len(hashes) == 3


def test_the_check_hashes_the_bytes_in_use_not_whatever_the_path_holds_later(
    tmp_path: Path,
) -> None:
    write(tmp_path)
    victim = tmp_path / "train-00000.tokens.npy"
    good = victim.read_bytes()
    flip_a_token_byte(victim)
    train = open_split(tmp_path, "train")
    replacement = tmp_path / "replacement"
    replacement.write_bytes(good)
    os.replace(replacement, victim)  # a good file appears after open; the mapped one is bad
    with pytest.raises(DataError, match="train-00000.tokens.npy is corrupt"):
        train.document(0)


@pytest.mark.parametrize(
    ("victim", "change"),
    [
        ("train-00001.tokens.npy", lambda b: b[:-1]),
        ("train-00001.tokens.npy", lambda b: b + b"\0\0"),
        ("train-00000.offsets.npy", lambda b: b[:-8]),
    ],
    ids=["truncated", "extended", "truncated-offsets"],
)
def test_a_wrong_size_is_caught_at_open_without_hashing(
    tmp_path: Path, hashes: list[int], victim: str, change: Any
) -> None:
    write(tmp_path)
    path = tmp_path / victim
    path.write_bytes(change(path.read_bytes()))
    with pytest.raises(DataError, match=rf"shard file .*{victim} is corrupt \([\d,]+ bytes where"):
        open_split(tmp_path, "train")
    assert hashes == []


def test_an_unreadable_header_is_named_at_open(tmp_path: Path) -> None:
    write(tmp_path)
    (tmp_path / "validation-00000.tokens.npy").write_bytes(b"not numpy at all")
    with pytest.raises(DataError, match=r"validation-00000.tokens.npy is unreadable"):
        open_split(tmp_path, "validation")


def test_corrupt_offsets_are_reported_as_corrupt_not_as_a_bad_index(tmp_path: Path) -> None:
    write(tmp_path)
    path = tmp_path / "train-00000.offsets.npy"
    data = bytearray(path.read_bytes())
    data[-12] ^= 0x7F  # the middle offset: no longer monotonic
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-00000.offsets.npy is corrupt"):
        open_split(tmp_path, "train")


def test_a_token_dtype_other_than_the_index_says_is_caught(tmp_path: Path) -> None:
    write(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    index["dtype"] = "uint32"
    with pytest.raises(DataError, match="disagrees with index.json"):
        open_split(tmp_path, "train", index)


def test_concurrent_readers_share_one_check_per_shard(tmp_path: Path, hashes: list[int]) -> None:
    write(tmp_path)
    flip_a_token_byte(tmp_path / "train-00001.tokens.npy")
    train = open_split(tmp_path, "train")
    start = threading.Barrier(8)

    def read(doc: int) -> str:
        start.wait()
        try:
            return str(train.document(doc).tolist())
        except DataError as error:
            return str(error)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(read, [0, 1, 2, 3, 4, 0, 2, 4]))
    assert results[0] == results[5] == str(list(range(10)))
    assert results[1] == str(list(range(40)))
    assert len({results[i] for i in (2, 3, 4, 6, 7)}) == 1
    assert "train-00001.tokens.npy is corrupt" in results[2]
    assert len(hashes) == 3  # train-00000: two files; train-00001: the tokens that failed


def test_verify_checks_every_shard_up_front(tmp_path: Path, hashes: list[int]) -> None:
    write(tmp_path)
    train = open_split(tmp_path, "train", verify=True)
    assert len(hashes) == 4  # two shards, two files each
    np.testing.assert_array_equal(train.document(4), np.arange(60))
    assert len(hashes) == 4  # nothing left to hash
    flip_a_token_byte(tmp_path / "train-00001.tokens.npy")
    with pytest.raises(DataError, match="train-00001.tokens.npy is corrupt"):
        open_split(tmp_path, "train", verify=True)
    corpus = open_split(tmp_path, "train")
    with pytest.raises(DataError, match="train-00001.tokens.npy is corrupt"):
        verify(corpus)
    verify(corpus_from_documents([np.arange(3)]))  # in-memory corpora have nothing to check


def test_the_streaming_writer_matches_np_save_byte_for_byte(tmp_path: Path) -> None:
    docs = [np.arange(n) % 70_000 for n in (12, 70_001, 5)]
    with ShardWriter(tmp_path, "train", vocab_size=70_000, shard_tokens=10) as writer:
        for doc in docs:
            writer.add(doc)
    assert [s["num_documents"] for s in writer.shards] == [1, 1, 1]
    for number, doc in enumerate(docs):
        saved = tmp_path / "saved.npy"
        np.save(saved, doc.astype(np.uint32))
        assert (tmp_path / f"train-{number:05d}.tokens.npy").read_bytes() == saved.read_bytes()
    write_index(tmp_path, {"train": writer.shards, "validation": writer.shards}, 70_000, {})
    assert sorted(p.name for p in tmp_path.glob("index.json*")) == ["index.json"]
    corpus = open_split(tmp_path, "train", verify=True)
    np.testing.assert_array_equal(corpus.document(1), docs[1])


def test_the_writer_refuses_tokens_outside_the_vocabulary_and_cleans_up(tmp_path: Path) -> None:
    with (
        pytest.raises(DataError, match="token id 300 is outside the vocabulary of 300"),
        ShardWriter(tmp_path, "train", vocab_size=300) as writer,
    ):
        writer.add(np.arange(5))
        writer.add(np.array([1, 300]))
    assert list(tmp_path.iterdir()) == []
