"""Stop requests from signals, turned into a clean checkpoint at the next step boundary.

A signal handler must never write a checkpoint itself: Accelerate's state saving is collective
and the handler may run on one rank only, in the middle of a step. The handlers installed here
only set a flag and record which signal asked; the training loop polls :func:`stop_reason` at
step boundaries, agrees on it across ranks (an all-reduce) and then saves on every rank.

The two signals mean what SLURM means by them:

* ``SIGUSR2`` → ``"preempt"``: the time-limit or preemption warning (submitit's ``--signal``);
  checkpoint, then requeue the job.
* ``SIGTERM`` → ``"terminate"``: ``scancel``, a node drain, or a requeue SLURM performs itself;
  checkpoint while there is time (SIGKILL follows after ``KillWait``) and exit, never requeue.

When both arrived, ``"terminate"`` wins: the job is going away whatever the warning said.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)

PREEMPT, TERMINATE = "preempt", "terminate"
REASONS = {signal.SIGUSR2: PREEMPT, signal.SIGTERM: TERMINATE}
DEFAULT_SIGNALS = tuple(REASONS)  # SIGUSR2 (NCCL uses SIGUSR1), SIGTERM

_stop = threading.Event()
_received: list[int] = []
_reasons: set[str] = set()
_previous: dict[int, Any] = {}


def _handler(signum: int, frame: Any) -> None:
    _received.append(signum)
    _reasons.add(REASONS.get(signum, TERMINATE))
    _stop.set()


def install_stop_handlers(signals: tuple[int, ...] = DEFAULT_SIGNALS) -> None:
    """Make the given signals request a stop instead of killing the process.

    Only works from the main thread (Python's rule); elsewhere it logs and does nothing.
    The replaced handlers (e.g. submitit's requeue handler) come back with :func:`restore_handlers`.
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


def adopt(reason: str) -> None:
    """Take on a stop another rank was asked for (the training loop's agreement), so that every
    rank reports the same :func:`stop_reason`."""
    if reason not in (PREEMPT, TERMINATE):
        raise ValueError(f"unknown stop reason {reason!r}; valid: {PREEMPT!r}, {TERMINATE!r}")
    _reasons.add(reason)
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def stop_reason() -> str | None:
    """``"terminate"`` (SIGTERM), ``"preempt"`` (SIGUSR2) or None; SIGTERM wins over SIGUSR2."""
    if TERMINATE in _reasons:
        return TERMINATE
    return PREEMPT if PREEMPT in _reasons else None


def received_signals() -> list[int]:
    return list(_received)


def clear() -> None:
    """Forget earlier stop requests (a second run in the same process starts clean)."""
    _stop.clear()
    _received.clear()
    _reasons.clear()
