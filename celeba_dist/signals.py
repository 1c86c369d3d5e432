"""Stop requests from signals, turned into a clean checkpoint at the next step boundary.

A signal handler must never write a checkpoint itself: Accelerate's state saving is collective
and the handler may run on one rank only, in the middle of a step. The handlers installed here
only record which signal asked (in the run's :class:`StopRequests`); the training loop polls it at
step boundaries, agrees on it across ranks (an all-reduce) and then saves on every rank.

The signals mean what SLURM (and a terminal) means by them:

* ``SIGUSR2`` → ``"preempt"``: the time-limit or preemption warning (submitit's ``--signal``);
  checkpoint, then requeue the job.
* ``SIGTERM`` → ``"terminate"``: ``scancel``, a node drain, or a requeue SLURM performs itself;
  checkpoint while there is time (SIGKILL follows after ``KillWait``) and exit, never requeue.
* ``SIGINT`` → ``"terminate"`` in a training run (:data:`RUN_SIGNALS`): Ctrl-C on a workstation is
  a cancel too. The terminal sends it to its foreground process group: a plain run and its loader
  workers, or ``torchrun`` / ``accelerate launch``, which forward it to each rank (every rank runs in
  a session of its own). Ctrl-C pressed again, at least :data:`FORCE_AFTER_S` after the first, gives
  up the checkpoint and raises :class:`KeyboardInterrupt`; the interval keeps one Ctrl-C that reaches
  a process twice (from the terminal, and from a wrapper in its group that forwards it) a single stop.
* ``SIGHUP`` → ``"terminate"`` in a training run: the terminal or the SSH session closed (the
  launchers forward it to the ranks too); checkpoint and exit rather than die with the work since the
  last checkpoint. Runs meant to outlive a session belong in ``tmux``, ``nohup`` or SLURM.

When both arrived, ``"terminate"`` wins: the job is going away whatever the warning said.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any, Iterator

log = logging.getLogger(__name__)

PREEMPT, TERMINATE = "preempt", "terminate"
REASONS = {signal.SIGUSR2: PREEMPT, signal.SIGTERM: TERMINATE, signal.SIGINT: TERMINATE, signal.SIGHUP: TERMINATE}
DEFAULT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)  # SIGUSR2 (NCCL uses SIGUSR1), SIGTERM
RUN_SIGNALS = (*DEFAULT_SIGNALS, signal.SIGINT, signal.SIGHUP)  # a training run's: Ctrl-C and a hangup checkpoint too
FORCE_AFTER_S = 2.0  # a SIGINT this long after the first: a person pressed Ctrl-C again


class StopRequests:
    """The stop requests of one run (or one pack): which signals arrived, and what they ask for.

    Each :func:`stop_requests` block records into a fresh one, so a run never inherits the stop of
    an earlier run in the same process.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._reasons: set[str] = set()
        self._first_interrupt: float | None = None

    def handle(self, signum: int, frame: Any = None) -> None:
        """The signal handler: record, nothing else (the loop acts at its next step boundary); a
        second Ctrl-C (see :data:`FORCE_AFTER_S`) raises :class:`KeyboardInterrupt` instead."""
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_interrupt is None:
                self._first_interrupt = now
            elif now - self._first_interrupt >= FORCE_AFTER_S:
                if _uncut["depth"]:
                    _uncut["pending"] = True
                    return
                raise KeyboardInterrupt(FORCED)
        self.received.append(signum)
        self._reasons.add(REASONS.get(signum, TERMINATE))

    def adopt(self, reason: str) -> None:
        """Take on a stop another rank was asked for (the training loop's agreement), so that every
        rank reports the same :meth:`reason`."""
        if reason not in (PREEMPT, TERMINATE):
            raise ValueError(f"unknown stop reason {reason!r}; valid: {PREEMPT!r}, {TERMINATE!r}")
        self._reasons.add(reason)

    def requested(self) -> bool:
        return bool(self._reasons)

    def reason(self) -> str | None:
        """``"terminate"`` (SIGTERM), ``"preempt"`` (SIGUSR2) or None; SIGTERM wins over SIGUSR2."""
        if TERMINATE in self._reasons:
            return TERMINATE
        return PREEMPT if PREEMPT in self._reasons else None


FORCED = "interrupted again: stopping now, without the checkpoint"
# A forced stop waits for the end of an :func:`uncut` block (the handler runs in the main thread, wherever
# it is, even while the signal is blocked there: another thread may take the delivery).
_uncut = {"depth": 0, "pending": False}


@contextlib.contextmanager
def uncut() -> Iterator[None]:
    """A block that Ctrl-C pressed again must not cut in half, such as a DataLoader starting its workers:
    cut there, the half-made iterator fails once more in its ``__del__``. The interrupt comes at its end."""
    _uncut["depth"] += 1
    try:
        yield
    finally:
        _uncut["depth"] -= 1
        if not _uncut["depth"] and _uncut["pending"]:
            _uncut["pending"] = False
            raise KeyboardInterrupt(FORCED)


def signal_names(received: list[int]) -> str:
    """"SIGTERM, SIGINT": the signals received, each once, in order."""
    return ", ".join(dict.fromkeys(signal.Signals(n).name for n in received))


@contextlib.contextmanager
def stop_requests(signals: tuple[int, ...] = DEFAULT_SIGNALS) -> Iterator[StopRequests]:
    """For the block, the given signals request a stop (recorded in the yielded :class:`StopRequests`)
    instead of killing the process; the handlers they replaced (e.g. submitit's) come back after it.

    Handlers can only be set from the main thread (Python's rule); elsewhere the block runs with the
    process's handlers, logged once, and nothing is recorded.
    """
    stops = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        log.warning("stop handlers not installed: not on the main thread")
        yield stops
        return
    previous = {sig: signal.signal(sig, stops.handle) for sig in signals}
    try:
        yield stops
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
