import itertools
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtdlm.data.pipeline import Prefetch, evaluation_rows, packed_batches
from rtdlm.data.shards import DataError, corpus_from_documents


def corpus_of(lengths: list[int]):  # type: ignore[no-untyped-def]
    """Document d holds the tokens 1000 * d + 0, 1, 2, ...: every token names its document."""
    return corpus_from_documents([1000 * d + np.arange(n) for d, n in enumerate(lengths)])


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 40), min_size=3, max_size=30),
    st.integers(1, 4),
    st.integers(2, 9),
    st.integers(0, 5),
)
def test_rows_pack_whole_documents_in_order_with_segment_ids(
    lengths: list[int], batch: int, seq_len: int, seed: int
) -> None:
    corpus = corpus_of(lengths)
    if corpus.num_tokens // (seq_len + 1) < batch:
        with pytest.raises(DataError, match="less than one batch"):
            next(packed_batches(corpus, batch, seq_len, seed))
        return
    for tokens, segments, _ in itertools.islice(packed_batches(corpus, batch, seq_len, seed), 5):
        assert tokens.shape == segments.shape == (batch, seq_len + 1)
        for row, seg in zip(tokens, segments, strict=True):
            assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
            docs = row // 1000
            # one document per segment, and consecutive tokens within it
            for s in np.unique(seg):
                assert len(np.unique(docs[seg == s])) == 1
                assert np.all(np.diff(row[seg == s]) == 1)


def test_an_epoch_visits_every_document_once_then_reshuffles() -> None:
    corpus = corpus_of([5] * 20)  # 100 tokens, rows of 5: 20 rows, batches of 4: 5 per epoch
    stream = packed_batches(corpus, batch_size=4, seq_len=4, seed=3)
    epoch0 = [next(stream) for _ in range(5)]
    epoch1 = [next(stream) for _ in range(5)]
    first = [int(t[0]) // 1000 for tokens, _, _ in epoch0 for t in tokens]
    second = [int(t[0]) // 1000 for tokens, _, _ in epoch1 for t in tokens]
    assert sorted(first) == sorted(second) == list(range(20)) and first != second
    assert epoch0[-1][2] == {"epoch": 0, "row": 20} and epoch1[0][2] == {"epoch": 1, "row": 4}


def test_resuming_from_a_position_gives_exactly_the_next_batches() -> None:
    corpus = corpus_of(list(range(3, 60)))
    straight = list(itertools.islice(packed_batches(corpus, 4, 16, seed=1), 30))
    position = straight[9][2]
    resumed = list(itertools.islice(packed_batches(corpus, 4, 16, seed=1, position=position), 20))
    for (a, b, pa), (c, d, pc) in zip(straight[10:], resumed, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
        assert pa == pc


def test_processes_split_every_global_batch_between_them() -> None:
    corpus = corpus_of(list(range(3, 60)))
    whole = list(itertools.islice(packed_batches(corpus, 4, 16, seed=1), 6))
    parts = [
        list(itertools.islice(packed_batches(corpus, 4, 16, 1, None, p, 2), 6)) for p in range(2)
    ]
    for i, (tokens, segments, position) in enumerate(whole):
        np.testing.assert_array_equal(tokens, np.concatenate([parts[0][i][0], parts[1][i][0]]))
        np.testing.assert_array_equal(segments, np.concatenate([parts[0][i][1], parts[1][i][1]]))
        assert parts[0][i][2] == parts[1][i][2] == position  # one position for every process
    with pytest.raises(DataError, match="must divide over 3 processes"):
        next(packed_batches(corpus, 4, 16, 1, None, 0, 3))


def test_evaluation_rows_are_fixed_and_too_little_data_is_clear() -> None:
    corpus = corpus_of([30] * 10)
    first = evaluation_rows(corpus, batch_size=2, seq_len=9, num_batches=3)
    again = evaluation_rows(corpus, batch_size=2, seq_len=9, num_batches=3)
    assert len(first) == 3
    for (a, b), (c, d) in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    with pytest.raises(DataError, match="validation split has 30 tokens"):
        evaluation_rows(corpus_of([30]), batch_size=4, seq_len=9, num_batches=1)


def test_prefetch_keeps_order_runs_ahead_and_reraises() -> None:
    produced: list[int] = []

    def source():  # type: ignore[no-untyped-def]
        for i in range(10):
            produced.append(i)
            yield i
        raise RuntimeError("shard 3 vanished")

    stream = Prefetch(source(), depth=3)
    assert next(stream) == 0
    threading.Event().wait(0.2)
    assert len(produced) >= 4  # it ran ahead while we waited
    assert [next(stream) for _ in range(9)] == list(range(1, 10))
    with pytest.raises(RuntimeError, match="shard 3 vanished"):
        next(stream)
    stream.close()
