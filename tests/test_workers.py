"""The data stages' worker pool: input order, bounded read-ahead, errors raised in the caller, workers gone after."""

from __future__ import annotations

import os
import threading

import pytest

from audiotune.data.workers import worker_pool


def _square(x: int) -> int:
    return x * x


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("row 3 is bad")
    return x


def _pid(_x: int) -> int:
    return os.getpid()


def test_imap_keeps_input_order_and_uses_the_workers():
    with worker_pool(2) as pool:
        assert list(pool.imap(_square, range(50), chunksize=3)) == [x * x for x in range(50)]
        pids = set(pool.imap(_pid, range(40), chunksize=1))
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_the_source_is_read_only_a_window_ahead_of_the_consumer():
    pulled = []
    lock = threading.Lock()

    def source():
        for i in range(100):
            with lock:
                pulled.append(i)
            yield i

    with worker_pool(2) as pool:
        it = pool.imap(_square, source(), chunksize=2)
        assert next(it) == 0
        with lock:
            ahead = len(pulled)
        # a window of 2 x processes chunks of 2 items (one freed by the chunk taken), plus the one being built
        assert ahead <= (2 * 2 + 1) * 2 + 2
        assert list(it) == [x * x for x in range(1, 100)]


def test_an_error_of_the_function_or_of_the_source_is_raised_to_the_caller():
    with worker_pool(2) as pool, pytest.raises(ValueError, match="row 3 is bad"):
        list(pool.imap(_fail_on_three, range(10)))

    def source():
        yield 1
        raise OSError("the listing broke")

    with worker_pool(2) as pool, pytest.raises(OSError, match="the listing broke"):
        list(pool.imap(_square, source()))


def test_leaving_the_block_early_stops_the_pool_and_its_workers():
    from tests.test_reliability import _alive, _children

    before = _children(os.getpid())  # servers other tests started (moto, MLflow) are children too
    with pytest.raises(KeyboardInterrupt), worker_pool(2) as pool:
        workers = _children(os.getpid()) - before
        for i, _ in enumerate(pool.imap(_square, range(10_000))):
            if i == 5:
                raise KeyboardInterrupt
    assert len(workers) == 2
    assert not any(_alive(w) for w in workers)
