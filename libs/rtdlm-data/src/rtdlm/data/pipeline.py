"""Packed, shuffled, resumable, process-sharded batches, prefetched on a background thread.

Each epoch orders the documents by a permutation drawn from (seed, epoch) and lays them end to
end as one stream; row r of the epoch is stream[r * (T + 1) : (r + 1) * (T + 1)], and its
segment ids number the documents inside it from 1, so attention and loss never cross a
document boundary. A batch is B consecutive rows; process p of P gets rows p*B/P..(p+1)*B/P-1
of every batch. The whole position is {"epoch", "row"}: identical on every process, saved in
every checkpoint, and enough to regenerate exactly the next batch.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from rtdlm.data.shards import Corpus, DataError


def epoch_layout(corpus: Corpus, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(document order, stream offset of each ordered document plus the total at the end)."""
    order = np.random.default_rng([seed, epoch]).permutation(corpus.num_documents)
    starts = np.concatenate([[0], np.cumsum(corpus.lengths[order])]).astype(np.int64)
    return order, starts


def identity_layout(corpus: Corpus) -> tuple[np.ndarray, np.ndarray]:
    order = np.arange(corpus.num_documents)
    return order, np.concatenate([[0], np.cumsum(corpus.lengths)]).astype(np.int64)


def packed_rows(
    corpus: Corpus, layout: tuple[np.ndarray, np.ndarray], rows: range, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows `rows` of the stream: tokens and 1-based segment ids, [len(rows), width]. Every
    document piece they hold is asked of the corpus at once, so a corpus in a bucket fetches
    them together."""
    order, starts = layout
    tokens = np.zeros((len(rows), width), np.int32)
    segments = np.zeros((len(rows), width), np.int32)
    wanted, places = [], []
    for r, row in enumerate(rows):
        begin, end = row * width, (row + 1) * width
        i = int(np.searchsorted(starts, begin, side="right")) - 1
        segment = 0
        while i < len(order) and starts[i] < end:
            lo, hi = max(begin, int(starts[i])), min(end, int(starts[i + 1]))
            if hi > lo:
                segment += 1
                wanted.append((int(order[i]), lo - int(starts[i]), hi - int(starts[i])))
                places.append((r, lo - begin, hi - begin, segment))
            i += 1
    for (r, a, b, segment), piece in zip(places, corpus.pieces(wanted), strict=True):
        tokens[r, a:b] = piece
        segments[r, a:b] = segment
    return tokens, segments


def rows_per_epoch(layout: tuple[np.ndarray, np.ndarray], width: int) -> int:
    return int(layout[1][-1] // width)


def packed_batches(
    corpus: Corpus,
    batch_size: int,
    seq_len: int,
    seed: int,
    position: dict[str, Any] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    fetch_ahead: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, int]]]:
    """Endless (tokens, segment_ids, position after this batch), [B / P, T + 1] each.

    With a corpus in a bucket, `fetch_ahead` batches after the one returned are fetched at
    the same time, on threads of their own, so a round trip longer than a step costs no more
    than its share; batches come out in order all the same. On a local disk a batch is memory
    copies, and threads would only add overhead."""
    if batch_size % process_count:
        raise DataError(f"data.batch_size {batch_size} must divide over {process_count} processes")
    width, local = seq_len + 1, batch_size // process_count
    epoch, row = int((position or {}).get("epoch", 0)), int((position or {}).get("row", 0))
    layout = epoch_layout(corpus, seed, epoch)
    if rows_per_epoch(layout, width) < batch_size:
        raise DataError(
            f"the training split has {corpus.num_tokens:,} tokens, less than one batch of "
            f"{batch_size} x {width}: use more data or a smaller data.batch_size/model.seq_len"
        )

    def plans() -> Iterator[tuple[tuple[np.ndarray, np.ndarray], range, dict[str, int]]]:
        nonlocal epoch, row, layout
        while True:
            if row + batch_size > rows_per_epoch(layout, width):  # the epoch's tail is dropped
                epoch, row = epoch + 1, 0
                layout = epoch_layout(corpus, seed, epoch)
            first = row + process_index * local
            row += batch_size
            yield layout, range(first, first + local), {"epoch": epoch, "row": row}

    if fetch_ahead <= 0 or not corpus.in_bucket:
        for rows_layout, rows, after in plans():
            yield (*packed_rows(corpus, rows_layout, rows, width), after)
        return
    pool = ThreadPoolExecutor(fetch_ahead + 1, thread_name_prefix="rtdlm-fetch")
    try:
        pending: collections.deque[tuple[Future, dict[str, int]]] = collections.deque()
        for rows_layout, rows, after in plans():
            pending.append((pool.submit(packed_rows, corpus, rows_layout, rows, width), after))
            if len(pending) > fetch_ahead:
                batch, done = pending.popleft()
                yield (*batch.result(), done)
    finally:  # closed: the fetches ahead are not needed, and must not hold up the exit
        pool.shutdown(wait=False, cancel_futures=True)


def evaluation_rows(
    corpus: Corpus, batch_size: int, seq_len: int, num_batches: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The held-out split's first rows in document order: the same at every evaluation."""
    layout, width = identity_layout(corpus), seq_len + 1
    available = rows_per_epoch(layout, width) // batch_size
    if available < 1:
        raise DataError(
            f"the validation split has {corpus.num_tokens:,} tokens, less than one batch of "
            f"{batch_size} x {width}: hold out more data or lower data.batch_size/model.seq_len"
        )
    return [
        packed_rows(corpus, layout, range(b * batch_size, (b + 1) * batch_size), width)
        for b in range(min(num_batches, available))
    ]


class Prefetch:
    """Runs an iterator `depth` items ahead on a daemon thread, in order; errors re-raise here."""

    _DONE = object()

    def __init__(self, source: Iterator[Any], depth: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(source,), daemon=True)
        self._thread.start()

    def _fill(self, source: Iterator[Any]) -> None:
        try:
            self._pump(source)
        finally:  # whatever `source` holds (threads, connections) goes with this thread
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _pump(self, source: Iterator[Any]) -> None:
        try:
            for item in source:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._DONE)
        except BaseException as error:  # handed to the consumer, which raises it
            self._queue.put(error)

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
