"""``celeba-dist jobs``: the submitted runs and sweeps, with their state, progress and best result.

Every run submitted through :mod:`celeba_dist.launch` keeps ``RUN_DIR/slurm_jobs.json``, a list of
events: ``submitted`` (by the submitting process), ``started`` (by rank 0 of each start, so a
requeued job appears once per start) and ``requeue``. The state comes from ``sacct`` (``squeue``
where accounting is off); progress and the best validation value come from the run folder
(``metrics.json`` at the end, ``rank_stats/``, the checkpoints' step numbers and TensorBoard
events while it trains), so this works from any machine that sees the folder.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

JOBS_FILE = "slurm_jobs.json"
SWEEP_FILE = "sweep.json"
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")  # celeba_dist.checkpoint's names


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
    """Append one event (``submitted``, ``started``, ``requeue``) to ``RUN_DIR/slurm_jobs.json``."""
    path = Path(run_dir) / JOBS_FILE
    with _locked(Path(run_dir)):
        records = read_jobs(run_dir)
        records.append({"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields})
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(records, indent=2) + "\n")
        tmp.replace(path)


def read_jobs(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / JOBS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def last_submission(run_dir: Path) -> dict[str, Any] | None:
    """The newest ``submitted`` record of the run (a requeue keeps the job id)."""
    submitted = [r for r in read_jobs(run_dir) if r["event"] == "submitted"]
    return submitted[-1] if submitted else None


def slurm_job_ids(run_dirs: list[Path]) -> list[str]:
    """The newest SLURM job id of each run (local runs have process ids, not job ids)."""
    subs = [last_submission(d) for d in run_dirs]
    return [str(s["job_id"]) for s in subs if s and s.get("executor", "slurm") == "slurm"]


def _local_state(pid: str) -> str:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return "ENDED(local)"
    return "RUNNING(local)"


# ---------------------------------------------------------------------------------------------
# Scheduler state


def scheduler_states(job_ids: list[str]) -> dict[str, str]:
    """Job id → state (``RUNNING``, ``COMPLETED``, ``PENDING``...) from sacct, else squeue.

    Array members are keyed ``ARRAYID_INDEX``; ids the scheduler does not know are left out.
    """
    ids = sorted({j.split("_")[0] for j in job_ids if j and j.split("_")[0].isdigit()})
    if not ids:
        return {}
    states: dict[str, str] = {}
    commands = [
        ["sacct", "--noheader", "--parsable2", "--allocations", "--format=JobID,State", "--jobs", ",".join(ids)],
        ["squeue", "--noheader", "--array", "--format=%i|%T", "--jobs", ",".join(ids)],
    ]
    for command in commands:
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in out.splitlines():
            job, _, state = line.partition("|")
            if state:
                states[job.strip()] = state.split()[0]  # "CANCELLED by 0" → "CANCELLED"
        return states
    return states


ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def wait_until_ended(job_ids: list[str], *, timeout_s: float = 60) -> dict[str, str]:
    """Poll until the scheduler has no job of ``job_ids`` active (results can land before it ends)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = scheduler_states(job_ids)
        if not any(states.get(j) in ACTIVE_STATES for j in job_ids) or time.monotonic() > deadline:
            return states
        time.sleep(1)


# ---------------------------------------------------------------------------------------------
# Progress from the run folder


@dataclass
class RunInfo:
    name: str
    run_dir: Path
    job_id: str | None
    state: str
    step: int | None
    epoch: int | None
    epochs: int | None
    metric: str
    best: float | None
    best_epoch: int | None
    overrides: list[str]

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


def run_info(run_dir: Path, states: dict[str, str], *, name: str | None = None,
             overrides: list[str] | None = None) -> RunInfo:
    """What the run folder says about a run, with the scheduler's state of its newest job."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    train = (config or {}).get("train", {})
    metric = train.get("select_metric", "accuracy")
    submission = last_submission(run_dir) or {}
    job_id = str(submission["job_id"]) if submission else None
    if submission.get("executor") == "local":
        state = _local_state(job_id)
    else:
        state = states.get(job_id or "", "UNKNOWN" if job_id else "-")
    results = _read_json(run_dir / "metrics.json")
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
    return RunInfo(name=name or run_dir.name, run_dir=run_dir, job_id=job_id, state=state, step=step, epoch=epoch,
                   epochs=train.get("epochs"), metric=metric, best=best, best_epoch=best_epoch,
                   overrides=list(overrides or []))


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
    infos = [run_info(d, states, name=m["name"], overrides=m["overrides"]) for d, m in zip(run_dirs, members)]
    if metric:
        for info in infos:
            if info.metric != metric:
                info.metric = metric
                info.best, _ = _best_from_events(info.run_dir, metric)
                info.best_epoch = None
    infos.sort(key=lambda i: (i.best is None, -(i.best or 0.0), i.name))
    rows = [[i.name, i.job_id or "-", i.state, i.progress(), i.best_text(), " ".join(i.overrides)] for i in infos]
    return format_table(rows, ["MEMBER", "JOB", "STATE", "PROGRESS", "BEST VAL", "OVERRIDES"]), infos


def runs_table(root: Path) -> tuple[str, list[RunInfo]]:
    run_dirs = find_runs(root)
    states = scheduler_states(slurm_job_ids(run_dirs))
    infos = [run_info(d, states, name=str(d.relative_to(root)) if d != root else d.name) for d in run_dirs]
    rows = [[i.name, i.job_id or "-", i.state, i.progress(), i.best_text()] for i in infos]
    return format_table(rows, ["RUN", "JOB", "STATE", "PROGRESS", "BEST VAL"]), infos


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
        table, _ = sweep_table(sweep_dir, metric=args.metric)
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
    return 0
