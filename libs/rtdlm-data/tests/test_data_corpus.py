import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtdlm.data.corpus import decode, encode, split_documents, stdlib_documents


@given(st.text())
def test_byte_tokens_round_trip(text: str) -> None:
    tokens = encode(text)
    assert tokens.dtype == np.int32
    assert ((tokens >= 0) & (tokens < 256)).all()
    assert decode(tokens) == text


def text(corpus) -> str:  # type: ignore[no-untyped-def]
    return "\n".join(decode(corpus.document(i)) for i in range(corpus.num_documents))


def test_stdlib_corpus_is_real_english_and_splits_cleanly() -> None:
    documents = stdlib_documents()
    assert len(documents) > 50
    splits = split_documents(documents)
    assert splits.train.num_tokens > 400_000
    assert splits.validation.num_tokens > 25_000
    assert " the " in decode(splits.train.document(0)) + decode(splits.train.document(1))
    # No held-out document appears in training, even where the corpus repeats one.
    train_text, validation_text = text(splits.train), text(splits.validation)
    held_out = [t for _, t in documents if t in validation_text and len(t) > 200]
    assert len(held_out) >= 5
    assert not any(t in train_text for t in held_out)


def test_duplicate_documents_never_straddle_the_split() -> None:
    documents = [(f"doc{i}", f"text number {i}") for i in range(20)]
    documents.append(("copy", documents[0][1]))  # the first held-out document, again
    splits = split_documents(documents)
    assert text(splits.train).count("text number 0") == 0
    assert splits.train.num_documents == 18 and splits.validation.num_documents == 2


def test_split_needs_enough_documents() -> None:
    with pytest.raises(ValueError, match="at least 10 distinct documents"):
        split_documents([("a", "text")])
