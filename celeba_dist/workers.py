"""Worker processes for packing, verifying and drawing the synthetic CelebA: how many by default, and an
ordered, bounded map over them.

One mechanism for every process pool of the package: a
``concurrent.futures.ProcessPoolExecutor``, because a worker that dies (the OOM killer, a crash in a
codec) makes it raise ``BrokenProcessPool`` at once, where ``multiprocessing.Pool.imap`` waits forever
for the dead worker's results.
"""
from __future__ import annotations

import collections
import ctypes
import itertools
import multiprocessing
import os
import signal
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator


class WorkerDiedError(RuntimeError):
    """A worker process ended without finishing its work (killed, out of memory, crashed)."""


def default_workers() -> int:
    """One per core, at most 8: past that the single writer (about 5,000 samples/s) is the limit."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


def process_context() -> multiprocessing.context.BaseContext:
    """Fork where the platform allows: workers inherit the opened source (a memory-mapped dataset)
    instead of unpickling it."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)


@contextmanager
def process_pool(workers: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple = ()) -> Iterator[ProcessPoolExecutor | None]:
    """``workers`` processes, shut down on exit (pending work cancelled); None when ``workers`` is 1:
    do the work in this process. The workers ignore Ctrl-C: the parent handles it and stops the pool.
    They die with the parent, even a SIGKILLed one (:func:`_die_with_parent`)."""
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, mp_context=process_context(), initializer=_start_worker,
                               initargs=(os.getpid(), initializer, initargs))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ordered_map(pool: ProcessPoolExecutor | None, fn: Callable[[Any], Any], items: Iterable[Any], *,
                chunksize: int = 64, window: int = 4) -> Iterator[Any]:
    """``map(fn, items)`` in ``pool``'s workers, results in order; at most ``window`` chunks per worker
    are in flight, so neither the items nor the results pile up in memory. A dead worker raises
    :class:`WorkerDiedError`."""
    if pool is None:
        yield from map(fn, items)
        return
    chunks = iter(lambda it=iter(items): list(itertools.islice(it, chunksize)), [])
    pending: collections.deque[Future] = collections.deque()
    limit = window * pool._max_workers
    for chunk in itertools.chain(chunks, [None]):
        if chunk is not None:
            pending.append(pool.submit(_apply, fn, chunk))
        while pending and (len(pending) >= limit or chunk is None):
            yield from _result(pending.popleft())


def _apply(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    return [fn(item) for item in chunk]


def _result(future: Future) -> list[Any]:
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise WorkerDiedError(f"a worker process died ({exc}); the machine may be out of memory: "
                              "run again with fewer --workers") from None


def _start_worker(parent: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this worker when ``parent`` dies (Linux).

    A parent killed with SIGKILL runs no cleanup: its workers would stay blocked on the pool's pipe
    for ever (each holds the pipe's other end open), and keep the caller's stdout open, so that
    ``celeba-dist pack ... | tail`` never returns. The signal is armed only now, so a parent that died
    before is caught by comparing ``getppid()`` with it. (The kernel watches the thread that forked:
    the executor forks its workers in the thread of the first ``submit``, which uses the pool to its end.)
    """
    if sys.platform.startswith("linux"):
        # valid arguments cannot fail; were prctl refused (a seccomp sandbox), the pool still works
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
