import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtdlm.train.data import (
    decode,
    encode,
    evaluation_windows,
    split_documents,
    stdlib_documents,
    window_batch,
)


@given(st.text())
def test_byte_tokens_round_trip(text: str) -> None:
    tokens = encode(text)
    assert tokens.dtype == np.int32
    assert ((tokens >= 0) & (tokens < 256)).all()
    assert decode(tokens) == text


def test_stdlib_corpus_is_real_english_and_splits_cleanly() -> None:
    documents = stdlib_documents()
    assert len(documents) > 50
    splits = split_documents(documents)
    assert len(splits.train) > 400_000
    assert len(splits.validation) > 25_000
    assert b" the " in bytes(splits.train[:20_000].astype(np.uint8).tolist())
    # No held-out document appears in training, even where the corpus repeats one.
    train_text, validation_text = decode(splits.train), decode(splits.validation)
    held_out = [text for _, text in documents if text in validation_text and len(text) > 200]
    assert len(held_out) >= 5
    assert not any(text in train_text for text in held_out)


def test_duplicate_documents_never_straddle_the_split() -> None:
    documents = [(f"doc{i}", f"text number {i}") for i in range(20)]
    documents.append(("copy", documents[0][1]))  # the first held-out document, again
    splits = split_documents(documents)
    assert decode(splits.train).count("text number 0") == 0


def test_split_needs_enough_documents() -> None:
    with pytest.raises(ValueError, match="at least 10 distinct documents"):
        split_documents([("a", "text")])


def test_window_batches_come_from_seed_and_index_alone() -> None:
    tokens = np.arange(1000, dtype=np.int32)
    first = window_batch(tokens, 4, 16, seed=7, index=3)
    again = window_batch(tokens, 4, 16, seed=7, index=3)
    assert first.shape == (4, 17)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, window_batch(tokens, 4, 16, seed=8, index=3))
    assert not np.array_equal(first, window_batch(tokens, 4, 16, seed=7, index=4))
    # Each window is a contiguous slice of the corpus.
    np.testing.assert_array_equal(np.diff(first, axis=1), np.ones((4, 16)))


def test_evaluation_windows_are_fixed() -> None:
    tokens = np.arange(1000, dtype=np.int32)
    batches = evaluation_windows(tokens, batch_size=2, seq_len=8, num_batches=3)
    assert [b.shape for b in batches] == [(2, 9)] * 3
    assert batches[0][0, 0] == 0 and batches[-1][-1, -1] == 999
