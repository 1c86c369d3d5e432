"""Worker processes for packing and verifying: how many by default, and a pool that never outlives its work."""
from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import signal
from contextlib import contextmanager
from typing import Callable, Iterator


def default_workers() -> int:
    """One per core, at most 8: past that the single writer (about 5,000 samples/s) is the limit."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


@contextmanager
def process_pool(workers: int, initializer: Callable[..., None] | None = None,
                 initargs: tuple = ()) -> Iterator[multiprocessing.pool.Pool | None]:
    """``workers`` processes, terminated on exit; None when ``workers`` is 1: do the work in this process.

    The workers ignore Ctrl-C: the parent handles it and stops the pool. They are forked where the
    platform allows, so they inherit the opened source (a memory-mapped dataset) instead of unpickling it.
    """
    if workers <= 1:
        yield None
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = context.Pool(workers, initializer=_start_worker, initargs=(initializer, initargs))
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _start_worker(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)
