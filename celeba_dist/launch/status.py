"""``celeba-dist jobs``: the submitted runs and sweeps, with their state, progress and best result.

Every run submitted through :mod:`celeba_dist.launch` keeps ``RUN_DIR/slurm_jobs.json``, a list of
events: ``submitted`` (by the submitting process), ``started`` (by rank 0 of each start, so a
requeued job appears once per start), ``requeue`` (USR2, requeued by the task), ``preempted``
(USR2 with ``run.max_requeues`` reached: not requeued) and ``terminated`` (SIGTERM: a cancel, or a
requeue SLURM performs itself). The state comes from ``sacct``, from ``scontrol show job`` where
sacct does not answer (no accounting, or a job it has not recorded yet), and from the run folder
where neither knows the job; the STARTS and LAST EVENT columns come from the records. Progress
and the best validation value come from the run folder (``metrics.json`` at the end,
``rank_stats/``, the checkpoints' step numbers and TensorBoard events while it trains), so this
works from any machine that sees the folder.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from celeba_dist.diskio import write_json
from celeba_dist.scheduler import ACTIVE_STATES, scheduler_states

JOBS_FILE = "slurm_jobs.json"
SWEEP_FILE = "sweep.json"
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")  # celeba_dist.train.checkpoint's names


# ---------------------------------------------------------------------------------------------
# The run folder's job records


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of the records (submitter and rank 0 may write at once)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / f".{JOBS_FILE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def record_job(run_dir: Path, event: str, **fields: Any) -> None:
    """Append one event (``submitted``, ``started``, ``requeue``, ``preempted``, ``terminated``) to
    ``RUN_DIR/slurm_jobs.json``."""
    path = Path(run_dir) / JOBS_FILE
    with _locked(Path(run_dir)):
        records = read_jobs(run_dir)
        records.append({"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields})
        write_json(path, records)


class JobRecordsError(ValueError):
    """``slurm_jobs.json`` is not a list of job records (empty, cut short, edited by hand)."""


def read_jobs(run_dir: Path) -> list[dict[str, Any]]:
    """The run's job records, [] before its first submission.

    A file that is not a list of records raises :class:`JobRecordsError` naming it: read as empty,
    it would hide the folder's jobs from ``submit``'s one-run-per-folder check.
    """
    path = Path(run_dir) / JOBS_FILE
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise JobRecordsError(f"{path} is unreadable ({exc}); repair it or move it aside") from None
    if not (isinstance(records, list) and all(isinstance(r, dict) and "event" in r for r in records)
            and all("job_id" in r for r in records if r["event"] == "submitted")):
        raise JobRecordsError(f"{path} is not a list of job records; repair it or move it aside")
    return records


def last_submission(run_dir: Path) -> dict[str, Any] | None:
    """The newest ``submitted`` record of the run (a requeue keeps the job id)."""
    submitted = [r for r in read_jobs(run_dir) if r["event"] == "submitted"]
    return submitted[-1] if submitted else None


def job_events(run_dir: Path, job_id: str | None) -> list[dict[str, Any]]:
    """The records of one job (all its starts: a requeue keeps the job id)."""
    return [r for r in read_jobs(run_dir) if job_id is not None and str(r.get("job_id")) == job_id]


def slurm_job_ids(run_dirs: list[Path]) -> list[str]:
    """The newest SLURM job id of each run (local runs have process ids, not job ids); runs whose
    records are unreadable have none."""
    subs = []
    for run_dir in run_dirs:
        with contextlib.suppress(JobRecordsError):
            subs.append(last_submission(run_dir))
    return [str(s["job_id"]) for s in subs if s and s.get("executor", "slurm") == "slurm"]


def active_jobs(run_dirs: list[Path]) -> dict[Path, tuple[str, str]]:
    """Run folder → (job id, state) of its last submitted job, where that job is still queued or running.

    A second job on such a folder would stop on the run lock once it starts (or take the folder
    from a job still pending), and ``jobs`` would show only the second.
    """
    states = scheduler_states(slurm_job_ids(run_dirs))
    active = {}
    for run_dir in run_dirs:
        submission = last_submission(run_dir)
        if not submission:
            continue
        job_id = str(submission["job_id"])
        local = submission.get("executor") == "local"
        state = _local_state(job_id) if local else states.get(job_id)
        if state in ACTIVE_STATES or state == "RUNNING(local)":
            active[run_dir] = (job_id, state)
    return active


def _local_state(pid: str) -> str:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return "ENDED(local)"
    return "RUNNING(local)"


# ---------------------------------------------------------------------------------------------
# Progress from the run folder


@dataclass
class RunInfo:
    name: str
    run_dir: Path
    job_id: str | None
    state: str
    starts: int
    last_event: str
    step: int | None
    epoch: int | None
    epochs: int | None
    metric: str
    best: float | None
    best_epoch: int | None
    overrides: list[str]
    error: str | None = None  # why the run folder's records could not be read

    def progress(self) -> str:
        step = "-" if self.step is None else f"step {self.step}"
        if self.epoch is None:
            return step
        return f"{step}, epoch {self.epoch}/{self.epochs or '?'}"

    def best_text(self) -> str:
        if self.best is None:
            return "-"
        where = f" @ epoch {self.best_epoch}" if self.best_epoch is not None else ""
        return f"{self.metric}={self.best:.4f}{where}"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _newest_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the newest ``checkpoints/step-NNNNNNNNN.pt`` (read from names, no torch import)."""
    steps = [int(m.group(1)) for p in (run_dir / "checkpoints").glob("step-*.pt") if (m := _STEP_FILE.match(p.name))]
    return max(steps, default=None)


def _best_from_events(run_dir: Path, metric: str) -> tuple[float | None, int | None]:
    """The best ``val/<metric>`` logged so far and its step, from the TensorBoard events."""
    events = run_dir / "tensorboard"
    if not any(events.glob("events.*")):
        return None, None
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(events), size_guidance={SCALARS: 0})
    acc.Reload()
    tag = f"val/{metric}"
    if tag not in acc.Tags().get("scalars", []):
        return None, None
    best = max(acc.Scalars(tag), key=lambda e: e.value)
    return best.value, best.step


# What the run folder's last record says where the scheduler no longer knows the job.
_FOLDER_STATES = {"terminated": "TERMINATED", "preempted": "PREEMPTED", "requeue": "REQUEUED"}


def run_state(scheduler: str | None, events: list[dict[str, Any]], *, finished: bool) -> str:
    """The STATE column: the scheduler's state, read with the run's own records.

    A job pending after it has started before was requeued (by ``submit``'s USR2 path or by SLURM)
    and shows ``PENDING(requeued)``; a job that ended after a USR2 with ``run.max_requeues`` reached
    shows ``PREEMPTED(not requeued)``. Where neither sacct nor scontrol knows the job, the run
    folder answers (``COMPLETED(folder)`` when ``metrics.json`` is there). A job cancelled after
    its run wrote ``metrics.json`` shows ``COMPLETED(cancelled after finishing)``.
    """
    starts = sum(e["event"] == "started" for e in events)
    last = next((e["event"] for e in reversed(events) if e["event"] != "submitted"), None)
    if scheduler is None:
        if finished:
            return "COMPLETED(folder)"
        return f"{_FOLDER_STATES[last]}(folder)" if last in _FOLDER_STATES else "UNKNOWN"
    if scheduler == "PENDING" and starts:
        return "PENDING(requeued)"
    if scheduler == "COMPLETED" and last == "preempted":
        return "PREEMPTED(not requeued)"
    if scheduler == "CANCELLED" and finished:  # a scancel during the last moments: the run is whole
        return "COMPLETED(cancelled after finishing)"
    return scheduler


def _event_text(events: list[dict[str, Any]]) -> str:
    last = next((e for e in reversed(events) if e["event"] != "submitted"), None)
    if last is None:
        return "-"
    return last["event"] + (f" @ step {last['step']}" if last.get("step") is not None else "")


def run_info(run_dir: Path, states: dict[str, str], *, name: str | None = None,
             overrides: list[str] | None = None) -> RunInfo:
    """What the run folder says about a run, with the scheduler's state of its newest job."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    train = (config or {}).get("train", {})
    metric = train.get("select_metric", "accuracy")
    submission = last_submission(run_dir) or {}
    job_id = str(submission["job_id"]) if submission else None
    events = job_events(run_dir, job_id)
    results = _read_json(run_dir / "metrics.json")
    if submission.get("executor") == "local":
        state = _local_state(job_id)
    else:
        state = run_state(states.get(job_id), events, finished=bool(results)) if job_id else "-"
    rank0 = _read_json(run_dir / "rank_stats" / "rank0.json") or {}
    step = max((s for s in (rank0.get("global_step"), _newest_checkpoint_step(run_dir)) if s is not None),
               default=None)
    epoch, best, best_epoch = rank0.get("epoch"), None, None
    if results:  # the run finished: its own summary
        best, best_epoch = results.get("select_metric_value"), results.get("best_epoch")
        history = results.get("history") or []
        if history:
            step = max(step or 0, history[-1].get("step", 0))
    else:
        best, best_step = _best_from_events(run_dir, metric)
        if best_step is not None:
            step = max(step or 0, best_step)
    return RunInfo(name=name or run_dir.name, run_dir=run_dir, job_id=job_id, state=state,
                   starts=sum(e["event"] == "started" for e in events), last_event=_event_text(events),
                   step=step, epoch=epoch,
                   epochs=train.get("epochs"), metric=metric, best=best, best_epoch=best_epoch,
                   overrides=list(overrides or []))


def unreadable_info(run_dir: Path, error: JobRecordsError, *, name: str,
                    overrides: list[str] | None = None) -> RunInfo:
    """The row of a run whose records cannot be read: shown as such, so the other runs still list."""
    return RunInfo(name=name, run_dir=run_dir, job_id=None, state="UNREADABLE", starts=0, last_event="-",
                   step=None, epoch=None, epochs=None, metric="accuracy", best=None, best_epoch=None,
                   overrides=list(overrides or []), error=str(error))


def safe_run_info(run_dir: Path, states: dict[str, str], *, name: str,
                  overrides: list[str] | None = None) -> RunInfo:
    """:func:`run_info`, or :func:`unreadable_info` where the records cannot be read."""
    try:
        return run_info(run_dir, states, name=name, overrides=overrides)
    except JobRecordsError as exc:
        return unreadable_info(run_dir, exc, name=name, overrides=overrides)


# ---------------------------------------------------------------------------------------------
# Finding runs and printing


def find_runs(root: Path) -> list[Path]:
    """Run folders (with ``slurm_jobs.json``) at ``root``, below it, or in its sweeps."""
    if (root / JOBS_FILE).is_file():
        return [root]
    return sorted({p.parent for pattern in (f"*/{JOBS_FILE}", f"*/*/{JOBS_FILE}") for p in root.glob(pattern)})


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def sweep_table(sweep_dir: Path, *, metric: str | None = None) -> tuple[str, list[RunInfo]]:
    """One table of the sweep's members, best first by the chosen metric."""
    sweep = json.loads((sweep_dir / SWEEP_FILE).read_text())
    members = sweep["members"]
    run_dirs = [sweep_dir / m["name"] for m in members]
    states = scheduler_states(slurm_job_ids(run_dirs))
    infos = [safe_run_info(d, states, name=m["name"], overrides=m["overrides"]) for d, m in zip(run_dirs, members)]
    if metric:
        for info in infos:
            if info.metric != metric:
                info.metric = metric
                info.best, _ = _best_from_events(info.run_dir, metric)
                info.best_epoch = None
    infos.sort(key=lambda i: (i.best is None, -(i.best or 0.0), i.name))
    rows = [[i.name, i.job_id or "-", i.state, str(i.starts), i.progress(), i.best_text(), i.last_event,
             " ".join(i.overrides)] for i in infos]
    return format_table(rows, ["MEMBER", "JOB", "STATE", "STARTS", "PROGRESS", "BEST VAL", "LAST EVENT",
                               "OVERRIDES"]), infos


def runs_table(root: Path) -> tuple[str, list[RunInfo]]:
    run_dirs = find_runs(root)
    states = scheduler_states(slurm_job_ids(run_dirs))
    infos = [safe_run_info(d, states, name=str(d.relative_to(root)) if d != root else d.name) for d in run_dirs]
    rows = [[i.name, i.job_id or "-", i.state, str(i.starts), i.progress(), i.best_text(), i.last_event]
            for i in infos]
    return format_table(rows, ["RUN", "JOB", "STATE", "STARTS", "PROGRESS", "BEST VAL", "LAST EVENT"]), infos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="celeba-dist jobs", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--run-dir", type=Path, default=Path("runs"),
                        help="a run folder, or a folder of runs and sweeps (default: runs)")
    parser.add_argument("--sweep", metavar="NAME",
                        help="one sweep (a folder under --run-dir, or a path) as a table sorted by --metric")
    parser.add_argument("--metric", default=None,
                        help="the mean validation metric to sort a sweep by (default: the runs' train.select_metric)")
    args = parser.parse_args(argv)

    if args.sweep:
        sweep_dir = Path(args.sweep) if (Path(args.sweep) / SWEEP_FILE).is_file() else args.run_dir / args.sweep
        if not (sweep_dir / SWEEP_FILE).is_file():
            parser.error(f"no {SWEEP_FILE} in {sweep_dir}")
        table, infos = sweep_table(sweep_dir, metric=args.metric)
        logdir = sweep_dir
    else:
        if not args.run_dir.is_dir():
            parser.error(f"{args.run_dir} is not a folder")
        table, infos = runs_table(args.run_dir)
        if not infos:
            print(f"no submitted runs under {args.run_dir} (looked for */{JOBS_FILE})")
            return 0
        logdir = args.run_dir
    print(table)
    print(f"\nTensorBoard: tensorboard --logdir {logdir.resolve()}")
    for info in infos:
        if info.error:
            print(f"celeba-dist jobs: error: {info.error}", file=sys.stderr)
    return 1 if any(info.error for info in infos) else 0
