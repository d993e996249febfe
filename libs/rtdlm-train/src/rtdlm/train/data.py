"""Byte-level text data: a corpus that ships with Python, split into train and held-out parts.

The default corpus is the reference documentation that CPython installs with its standard
library (`pydoc_data.topics`, about a megabyte of English), so training needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BYTE_VOCAB_SIZE = 256


@dataclass(frozen=True)
class Splits:
    train: np.ndarray
    validation: np.ndarray


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes as int32 token ids in [0, 256)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(tokens: np.ndarray) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def stdlib_documents() -> list[tuple[str, str]]:
    """(topic, text) pairs of CPython's bundled documentation, in a stable order."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def split_documents(
    documents: list[tuple[str, str]], validation_every: int = 10, separator: str = "\n\n"
) -> Splits:
    """Every validation_every-th distinct document is held out. Whole documents go to one side
    and duplicates are dropped first, so held-out text never appears in training."""
    texts = list(dict.fromkeys(text for _, text in documents))
    train = [text for i, text in enumerate(texts) if i % validation_every]
    validation = [text for i, text in enumerate(texts) if not i % validation_every]
    if not train or not validation:
        raise ValueError(
            f"need at least {validation_every} distinct documents to split, got {len(texts)}"
        )
    return Splits(
        train=encode(separator.join(train)), validation=encode(separator.join(validation))
    )


def window_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, index: int
) -> np.ndarray:
    """Batch `index` of an endless stream: [batch_size, seq_len + 1] windows at random offsets
    drawn from (seed, index) alone, so any batch can be regenerated to resume exactly."""
    if len(tokens) <= seq_len + 1:
        raise ValueError(
            f"corpus of {len(tokens)} tokens is shorter than one window of {seq_len + 1}"
        )
    starts = np.random.default_rng([seed, index]).integers(0, len(tokens) - seq_len - 1, batch_size)
    return np.stack([tokens[s : s + seq_len + 1] for s in starts])


def evaluation_windows(
    tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int
) -> list[np.ndarray]:
    """A fixed set of evenly spaced windows, the same at every evaluation."""
    count = batch_size * num_batches
    starts = np.linspace(0, len(tokens) - seq_len - 1, count).astype(np.int64)
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts])
    return list(windows.reshape(num_batches, batch_size, seq_len + 1))
