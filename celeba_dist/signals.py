"""Stop requests from signals, turned into a clean checkpoint at the next step boundary.

A signal handler must never write a checkpoint itself: Accelerate's state saving is collective
and the handler may run on one rank only, in the middle of a step. The handlers installed here
only set a flag; the training loop polls :func:`stop_requested` at step boundaries, agrees on it
across ranks (an all-reduce) and then saves on every rank.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

_stop = threading.Event()
_received: list[int] = []
_previous: dict[int, Any] = {}

# SIGUSR2: SLURM's pre-timeout/preemption signal under submitit (NCCL uses SIGUSR1).
# SIGTERM: what SLURM, Kubernetes and most schedulers send before killing.
DEFAULT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def _handler(signum: int, frame: Any) -> None:
    _received.append(signum)
    _stop.set()


def install_stop_handlers(signals: tuple[int, ...] = DEFAULT_SIGNALS) -> None:
    """Make the given signals request a stop instead of killing the process.

    Only works from the main thread (Python's rule); elsewhere it logs and does nothing.
    The replaced handlers are kept, see :func:`previous_handler`.
    """
    if threading.current_thread() is not threading.main_thread():
        log.warning("stop handlers not installed: not on the main thread")
        return
    for sig in signals:
        old = signal.signal(sig, _handler)
        if old is not _handler:
            _previous[sig] = old


def restore_handlers() -> None:
    """Put back the handlers that :func:`install_stop_handlers` replaced."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, old in list(_previous.items()):
        signal.signal(sig, old if old is not None else signal.SIG_DFL)
    _previous.clear()


def previous_handler(sig: int) -> Callable[..., Any] | int | None:
    """The handler that was installed for ``sig`` before ours (e.g. submitit's requeue handler)."""
    return _previous.get(sig)


def request_stop() -> None:
    """Ask the training loop to checkpoint and return at the next step boundary."""
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def received_signals() -> list[int]:
    return list(_received)


def clear() -> None:
    _stop.clear()
    _received.clear()
