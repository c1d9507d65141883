"""Worker processes that never outlive the stage: a pool stopped on any error or signal, and signals as exceptions.

:func:`stop_on_signals` turns SIGTERM (what Kubernetes and ``kill`` send) and SIGINT into
:class:`~audiotune.errors.Interrupted` in the main thread, so every ``with`` block of the stage unwinds:
the staging folder is removed, the tracking run ends, and :func:`worker_pool` terminates its workers.
Workers ignore SIGINT (the parent decides) and, on Linux, are sent SIGTERM by the kernel if the parent
dies without unwinding (SIGKILL, OOM).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.pool import Pool

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


@contextmanager
def worker_pool(processes: int, initializer: Callable[..., None] | None = None,
                initargs: tuple = ()) -> Iterator[Pool]:
    """A process pool that is closed and joined on success, and terminated on any exception or interrupt.

    The one pool of the data stages (convert, tokenize): use it inside :func:`stop_on_signals`.

    Args:
        processes: Number of worker processes.
        initializer: Called in each worker with ``initargs`` once its signals are set (a module-level
            function: it is pickled by reference).
        initargs: Arguments of ``initializer``.
    """
    pool = multiprocessing.get_context().Pool(processes, initializer=_init_worker, initargs=(initializer, initargs))
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


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
