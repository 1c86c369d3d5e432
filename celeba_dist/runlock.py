"""One run per folder: ``RUN/.lock`` names the process that trains in it (or writes into it: ``pack`` and
``synth`` take the same lock on their output folder).

The lock is a small JSON record: host, pid, SLURM job id and restart count, start time, last
refresh and a token unique to this acquisition. It is created by ``link(2)``-ing a complete
temporary file of our own to the lock's name, the step that is atomic on NFS and on the other
shared filesystems clusters use (``flock`` does not reach across NFS clients everywhere, and
``O_EXCL`` is not atomic on every NFS version); the token read back decides who got it, which
also covers a link whose success the server reported as a failure. While the run lives a daemon
thread rewrites the record (temporary file + rename) every ``refresh_s`` seconds.

A lock is stale, and taken over with a warning, when its holder ran on this host and its pid is
gone, when it was not refreshed for ``stale_s`` seconds (``run.lock_stale_s``; the hosts' clocks
must agree to well within that, as NTP keeps them), or when it belongs to an earlier start of the
same SLURM job (same ``SLURM_JOB_ID``, lower ``SLURM_RESTART_COUNT``: a requeued job takes over
from its old incarnation), or when its holder's SLURM job has ended as the scheduler tells (a job
SIGKILLed on another node frees its folder at once, not after ``stale_s``). Two processes taking
over the same stale lock cannot both win: each renames the lock file to a name of its own and goes
on only when what it moved is exactly the record it judged stale (else it puts the file back); the
new lock is then linked as above.
Releasing uses the same rename-and-check, so a run never deletes a lock that is not its own.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import threading
import time
import uuid
from pathlib import Path
from typing import Mapping

from celeba_dist.diskio import translate_disk_full
from celeba_dist.scheduler import ACTIVE_STATES, scheduler_states

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
REFRESH_S = 30.0  # the longest interval between refreshes (shorter when stale_s is small)
_ATTEMPTS = 20  # create → read → take over rounds before giving up on a lock that keeps changing


class RunLockedError(RuntimeError):
    """The run folder is held by a live run; the message names the holder."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written in the lock file (times are seconds since the epoch)."""

    host: str
    pid: int
    job_id: str | None
    restart: int
    started: float
    refreshed: float
    token: str

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        job = f"SLURM job {self.job_id} (restart {self.restart})" if self.job_id else "not a SLURM job"
        return (f"pid {self.pid} on host {self.host}, {job}, started {_stamp(self.started)}, "
                f"last refreshed {_stamp(self.refreshed)} ({now - self.refreshed:.0f} s ago)")


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def this_process(environ: Mapping[str, str] | None = None) -> Holder:
    """The record this process would write, with a new token."""
    environ = os.environ if environ is None else environ
    now = time.time()
    return Holder(host=platform.node(), pid=os.getpid(), job_id=environ.get("SLURM_JOB_ID") or None,
                  restart=int(environ.get("SLURM_RESTART_COUNT") or 0), started=now, refreshed=now,
                  token=uuid.uuid4().hex)


def read_holder(path: Path) -> Holder | None:
    """The record in the lock file ``path``; None when there is none.

    A file that is not a lock record (damaged by hand or by a crashed disk) counts as a holder of
    unknown identity last refreshed at the file's modification time, so it turns stale like any other.
    """
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return Holder(**{f.name: data[f.name] for f in dataclasses.fields(Holder)})
    except (ValueError, KeyError, TypeError):
        return Holder(host="unknown (unreadable lock file)", pid=0, job_id=None, restart=0, started=mtime,
                      refreshed=mtime, token=f"unreadable:{mtime!r}:{len(text)}")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a pid reused since counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def stale_reason(holder: Holder, me: Holder, *, stale_s: float, now: float | None = None) -> str | None:
    """Why ``me`` may take the lock of ``holder`` over, or None while the holder counts as alive."""
    now = time.time() if now is None else now
    if holder.job_id and holder.job_id == me.job_id and holder.restart < me.restart:
        return f"it is an earlier start of this SLURM job (restart {holder.restart}, this is restart {me.restart})"
    if holder.host == me.host and not pid_alive(holder.pid):
        return f"process {holder.pid} no longer runs on {holder.host}"
    if now - holder.refreshed > stale_s:
        return f"it was not refreshed for {now - holder.refreshed:.0f} s (stale after {stale_s:g} s)"
    if holder.job_id and holder.job_id != me.job_id:
        ended = _slurm_job_ended(holder.job_id)
        if ended:
            return f"its SLURM job {holder.job_id} has ended ({ended})"
    return None


def _slurm_job_ended(job_id: str) -> str | None:
    """The final state of SLURM job ``job_id`` (``CANCELLED``, ``FAILED``...) once the scheduler says it
    has ended; None while it is queued or runs (a requeued job is pending: it will want its folder back),
    and where no scheduler answers (no SLURM client here, a job it has forgotten)."""
    state = scheduler_states([job_id]).get(job_id)
    return state if state and state not in ACTIVE_STATES else None


@dataclasses.dataclass(frozen=True)
class User:
    """Who locks a folder, as the messages name it: ``run`` (a training's run folder), ``pack`` or ``synth``
    (their output), ``submit`` (a run folder while a job for it is being queued)."""

    noun: str  # "run", "pack", "synth", "submit"
    folder: str  # "run folder", "output folder"
    elsewhere: str  # how to choose another folder
    stale_key: str = ""  # the setting of ``stale_s``, if any
    lock_name: str = LOCK_NAME  # the lock's file in the folder


# A pack's or synth's lock not refreshed for this long (its host died) is taken over; a dead pid on the
# same host frees it at once. Training has run.lock_stale_s instead.
OUTPUT_LOCK_STALE_S = 300.0

RUN = User("run", "run folder", "Use another --run-dir", "run.lock_stale_s")
PACK = User("pack", "output folder", "Pack into another folder")
SYNTH = User("synth", "output folder", "Write into another OUT_DIR")
# submit and sweep, from their folder check until the job is recorded in slurm_jobs.json (seconds): a lock of
# its own, since the job may start and take the run's lock meanwhile
SUBMIT = User("submit", "run folder", "Use another --run-dir", "run.lock_stale_s", lock_name=".submit.lock")


def locked_message(run_dir: Path, holder: Holder, *, stale_s: float, user: User = RUN) -> str:
    key = f" ({user.stale_key})" if user.stale_key else ""
    return (f"{user.folder} {run_dir} is in use by another {user.noun}: {holder.describe()}. {user.elsewhere}, or "
            f"wait for that {user.noun} to end; a lock whose holder died is taken over once it is {stale_s:g} s "
            f"old{key}, at once on the holder's host or once its SLURM job has ended; delete "
            f"{run_dir / user.lock_name} only if you are sure that {user.noun} is gone")


# ---------------------------------------------------------------------------------------------
# File operations: every change of the lock's name is a link or a rename of a complete file


def _write_temp(path: Path, holder: Holder) -> Path:
    """A complete, synced copy of ``holder`` under a name of this acquisition's own, next to ``path``."""
    tmp = path.with_name(f"{path.name}.{holder.token}.{time.monotonic_ns()}.tmp")
    try:
        with translate_disk_full(path), open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(dataclasses.asdict(holder), indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:  # a full disk (named as such): no partial copy is left next to the lock
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _create(path: Path, holder: Holder) -> None:
    """Create ``path`` holding ``holder`` unless some lock is there (the caller reads back who won)."""
    tmp = _write_temp(path, holder)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _rewrite(path: Path, holder: Holder) -> None:
    os.replace(_write_temp(path, holder), path)


def _move_aside(path: Path, expected: Holder) -> bool:
    """Remove the lock ``path`` if it still holds exactly ``expected``; True when it did.

    The rename is atomic, so of several processes moving the same file only one gets it; one that
    moved a different record (a newer lock, a refresh) links it back under the lock's name.
    """
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}.aside")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        if read_holder(aside) == expected:
            return True
        try:
            os.link(aside, path)
        except FileExistsError:  # a third process created a lock meanwhile: that one stands
            log.error("the lock %s changed while it was checked; %s holds it now", path, read_holder(path))
        return False
    finally:
        aside.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The held lock


class RunLock:
    """A lock this process holds; a daemon thread keeps it fresh until :meth:`release`.

    ``lost`` is set (and an error logged) when the refresher finds the lock is no longer ours:
    another process judged it stale and took the folder over.
    """

    def __init__(self, path: Path, holder: Holder, *, refresh_s: float, user: User = RUN):
        self.path, self.user = path, user
        self.holder = holder
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep_fresh, args=(refresh_s,), name="run-lock", daemon=True)
        self._thread.start()

    def is_ours(self) -> bool:
        current = read_holder(self.path)
        return current is not None and current.token == self.holder.token

    def refresh(self) -> bool:
        """Rewrite the lock with the time now; False (``lost`` set) when it is no longer ours."""
        current = read_holder(self.path)
        if current is None or current.token != self.holder.token:
            if not self.lost.is_set():
                why = f"taken over by {current.describe()}" if current else "the file is gone"
                log.error("lost the lock of %s %s: %s; another %s may be writing into this folder", self.user.folder,
                          self.path.parent, why, self.user.noun)
            self.lost.set()
            return False
        fresh = dataclasses.replace(self.holder, refreshed=time.time())
        _rewrite(self.path, fresh)
        self.holder = fresh
        return True

    def _keep_fresh(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                if not self.refresh():
                    return
            except OSError as exc:  # a file server hiccup: the next round tries again
                log.warning("could not refresh the lock %s: %s", self.path, exc)

    def release(self) -> None:
        """Stop refreshing and remove the lock if it is still ours."""
        self._stop.set()
        self._thread.join()
        if not self.lost.is_set() and not _move_aside(self.path, self.holder):
            log.error("the lock %s was not ours any more at the end of the run; left in place", self.path)


def acquire(run_dir: Path, *, stale_s: float, refresh_s: float | None = None,
            environ: Mapping[str, str] | None = None, user: User = RUN) -> RunLock:
    """Lock ``run_dir`` (created if missing) for this process, taking a stale lock over with a warning.

    Raises :class:`RunLockedError` naming the holder when a live run holds it. ``refresh_s``
    defaults to ``min(30, stale_s / 4)``; ``environ`` (default ``os.environ``) gives the SLURM job.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / user.lock_name
    me = this_process(environ)
    for _ in range(_ATTEMPTS):
        try:
            _create(path, me)
        except FileNotFoundError:  # a refused submit that also found the folder new removed it, still empty
            run_dir.mkdir(parents=True, exist_ok=True)
            continue
        holder = read_holder(path)
        if holder is None:  # released between the two steps
            continue
        if holder.token == me.token:
            return RunLock(path, me, refresh_s=refresh_s or min(REFRESH_S, stale_s / 4), user=user)
        reason = stale_reason(holder, me, stale_s=stale_s)
        if reason is None:
            raise RunLockedError(locked_message(run_dir, holder, stale_s=stale_s, user=user))
        if _move_aside(path, holder):
            log.warning("%s %s: taking over the lock of %s, because %s (%s)", user.folder, run_dir,
                        holder.describe(), reason, path.name)
    raise RunLockedError(f"could not lock {path} in {_ATTEMPTS} attempts: other processes keep changing it")


def live_holder(run_dir: Path, *, stale_s: float, environ: Mapping[str, str] | None = None) -> Holder | None:
    """The holder of ``run_dir``'s lock when it counts as alive seen from this process, else None."""
    holder = read_holder(Path(run_dir) / LOCK_NAME)
    if holder is None or stale_reason(holder, this_process(environ), stale_s=stale_s) is not None:
        return None
    return holder
