"""Byte-level text data: a corpus that ships with Python, split into train and held-out parts.

The default corpus is the reference documentation that CPython installs with its standard
library (`pydoc_data.topics`, about a megabyte of English), so training needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rtdlm.data.shards import Corpus, corpus_from_documents

BYTE_VOCAB_SIZE = 256


@dataclass(frozen=True)
class Splits:
    train: Corpus
    validation: Corpus


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes as int32 token ids in [0, 256)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(tokens: np.ndarray) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def stdlib_documents() -> list[tuple[str, str]]:
    """(topic, text) pairs of CPython's bundled documentation, in a stable order."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def split_documents(documents: list[tuple[str, str]], validation_every: int = 10) -> Splits:
    """Every validation_every-th distinct document is held out. Whole documents go to one side
    and duplicates are dropped first, so held-out text never appears in training."""
    texts = list(dict.fromkeys(text for _, text in documents if text))
    train = [encode(text) for i, text in enumerate(texts) if i % validation_every]
    validation = [encode(text) for i, text in enumerate(texts) if not i % validation_every]
    if not train or not validation:
        raise ValueError(
            f"need at least {validation_every} distinct documents to split, got {len(texts)}"
        )
    return Splits(corpus_from_documents(train), corpus_from_documents(validation))
