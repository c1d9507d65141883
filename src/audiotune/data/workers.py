"""Worker processes that never outlive the stage: a pool stopped on any error or signal, and signals as exceptions.

:func:`stop_on_signals` turns SIGTERM (what Kubernetes and ``kill`` send) and SIGINT into
:class:`~audiotune.errors.Interrupted` in the main thread, so every ``with`` block of the stage unwinds:
the staging folder is removed, the tracking run ends, and :func:`worker_pool` stops its workers.
Workers ignore SIGINT (the parent decides) and, on Linux, are sent SIGTERM by the kernel if the parent
dies without unwinding (SIGKILL, OOM).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

from audiotune.errors import Interrupted

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def num_workers(requested: int) -> int:
    """Worker processes: ``requested``, or one per available core when 0."""
    if requested > 0:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent exits (Linux only; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) is not available")


def _init_worker(initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, inherited through fork
    _die_with_parent()
    if initializer is not None:
        initializer(*initargs)


class WorkerPool:
    """Processes that map a function over items in input order, with a bounded number of chunks in flight.

    Built on :class:`concurrent.futures.ProcessPoolExecutor`, not :class:`multiprocessing.pool.Pool`:
    ``Pool.terminate()`` deadlocks when a worker is writing a result larger than the pipe buffer at the moment
    the pool's result thread exits (the main thread then waits forever for the queue lock the worker holds).
    A converted row carries its FLAC bytes, so a SIGTERM mid-convert hung one run in 40 on a loaded 2-core
    machine (``convert`` of 24 two-minute rows, signal 0-2.5 s in); the executor's shutdown instead reads
    every result until its workers exit. Items are read by a feeder thread, at most ``2 x processes`` chunks
    ahead, so a lazy source (the spooled S3 reads of :mod:`audiotune.stages.convert_units`) is never read far
    ahead.
    """

    def __init__(self, executor: ProcessPoolExecutor, processes: int):
        self._executor = executor
        self._window = 2 * processes
        self._stops: list[threading.Event] = []

    def stop(self) -> None:
        """Stop every feeder: nothing more is submitted."""
        for event in self._stops:
            event.set()

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int = 1) -> Iterator[Any]:
        """``fn`` of each item, in item order (an exception of ``fn`` or of ``items`` is raised here)."""
        slots = threading.Semaphore(self._window)
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()
        self._stops.append(stop)

        def feed() -> None:
            try:
                it = iter(items)
                while chunk := list(itertools.islice(it, max(1, chunksize))):
                    while not slots.acquire(timeout=0.1):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    ready.put(self._executor.submit(_run_chunk, fn, chunk))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                ready.put(_Failed(exc))
            finally:
                ready.put(_END)

        feeder = threading.Thread(target=feed, name="audiotune-pool-feeder", daemon=True)
        feeder.start()
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, _Failed):
                    raise item.exc
                results = item.result()
                slots.release()
                yield from results
        finally:
            stop.set()
            while True:  # what was submitted and not consumed is not wanted
                try:
                    item = ready.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, Future):
                    item.cancel()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def _noop() -> None:
    return None


def _run_chunk(fn: Callable[[Any], Any], chunk: list) -> list:
    return [fn(x) for x in chunk]


@contextmanager
def worker_pool(processes: int, initializer: Callable[..., None] | None = None,
                initargs: tuple = ()) -> Iterator[WorkerPool]:
    """A process pool that stops taking work on any exception or interrupt and is shut down when the block ends.

    On an interrupt the workers finish the chunk they hold and exit; they are not killed, since a worker killed
    while it writes a result leaves the pipe half-written and the reading thread blocked for good (measured:
    one hang in 60 signalled converts). Callers keep chunks to a few rows so that this takes seconds.

    The one pool of the data stages (convert, tokenize): use it inside :func:`stop_on_signals`.

    Args:
        processes: Number of worker processes.
        initializer: Called in each worker with ``initargs`` once its signals are set (a module-level
            function: it is pickled by reference).
        initargs: Arguments of ``initializer``.
    """
    executor = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(),
                                   initializer=_init_worker, initargs=(initializer, initargs))
    pool = WorkerPool(executor, processes)
    try:
        # the workers are forked now, by this thread: the kernel's parent-death signal follows the thread that
        # forked, and the feeder thread that submits later ends with its items
        executor.submit(_noop).result()
        yield pool
    finally:
        pool.stop()
        executor.shutdown(wait=True, cancel_futures=True)


@contextmanager
def stop_on_signals(what: str) -> Iterator[None]:
    """Inside the block SIGTERM and SIGINT raise :class:`Interrupted` (exit code 128 + signal) in the main thread.

    Outside the main thread (where handlers cannot be set) the block runs unchanged.

    Args:
        what: What is stopped, for the message (``"convert"``).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, _frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal does not interrupt the unwinding
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Interrupted(signum, what)

    saved = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
