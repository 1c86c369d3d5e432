"""What SLURM's scheduler says of jobs: their states from ``sacct``, and from ``scontrol show job``
where accounting does not answer or lags. Every query degrades to "unknown" (the id left out)
where no SLURM client is installed or the scheduler does not answer, so callers work off a cluster.

Used by ``celeba-dist jobs`` and ``submit --wait`` (:mod:`celeba_dist.launch`) and by the run lock
(:mod:`celeba_dist.runlock`), which frees the folder of a job that has ended.
"""
from __future__ import annotations

import subprocess
import time

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def scheduler_states(job_ids: list[str]) -> dict[str, str]:
    """Job id → state (``RUNNING``, ``COMPLETED``, ``PENDING``...) from sacct, and from
    ``scontrol show job`` where sacct does not answer or lags: a cluster without accounting, a job
    the database has not recorded yet, and every job sacct still calls active (after a requeue sacct
    says REQUEUED for a while when the controller already has the job PENDING again). ``scontrol``
    knows a job until ``MinJobAge`` after it ends.

    Array members are keyed ``ARRAYID_INDEX``; ids neither knows are left out.
    """
    ids = _base_ids(job_ids)
    if not ids:
        return {}
    states = _sacct_states(ids)

    def settled(base: str) -> bool:
        known = [state for job, state in states.items() if job.split("_")[0] == base]
        return bool(known) and not any(state in ACTIVE_STATES for state in known)

    ask = [i for i in ids if not settled(i)]
    if ask:
        states.update(controller_states(ask))
    return states


def controller_states(job_ids: list[str]) -> dict[str, str]:
    """Job id → state as the controller has it now (``scontrol show job``; no accounting needed)."""
    states: dict[str, str] = {}
    for base in _base_ids(job_ids):
        out = _run(["scontrol", "--oneliner", "show", "job", base])  # fails for a job it has forgotten
        for line in (out or "").splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if "JobState" not in fields:
                continue
            array, task = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
            keys = [f"{array}_{t}" for t in _expand_tasks(task)] if array and task else [fields["JobId"]]
            states.update(dict.fromkeys(keys, fields["JobState"]))
    return states


def _sacct_states(ids: list[str]) -> dict[str, str]:
    out = _run(["sacct", "--noheader", "--parsable2", "--allocations", "--format=JobID,State", "--jobs",
                ",".join(ids)])
    states: dict[str, str] = {}
    for line in (out or "").splitlines():
        job, _, state = line.partition("|")
        base, _, task = job.strip().partition("_")
        if not state:
            continue
        keys = [f"{base}_{t}" for t in _expand_tasks(task.strip("[]"))] if task else [base]
        states.update(dict.fromkeys(keys, state.split()[0]))  # "CANCELLED by 0" → "CANCELLED"
    return states


def _run(command: list[str]) -> str | None:
    """stdout of a SLURM client command, or None where it is missing or fails."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _base_ids(job_ids: list[str]) -> list[str]:
    return sorted({j.split("_")[0] for j in job_ids if j and j.split("_")[0].isdigit()})


def _expand_tasks(spec: str) -> list[str]:
    """SLURM's array task lists: ``"3"``, ``"0-2%3"``, ``"1,4-5"`` → ``["3"]``, ``["0", "1", "2"]``..."""
    tasks: list[str] = []
    for part in spec.split("%")[0].split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            tasks.extend(str(t) for t in range(int(low), int(high or low) + 1))
    return tasks


def wait_until_ended(job_ids: list[str], *, timeout_s: float = 60) -> dict[str, str]:
    """Poll until no job of ``job_ids`` is active, its processes included: results can land
    before a job ends, and sacct says CANCELLED while the controller still lets the tasks
    checkpoint (COMPLETING)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = scheduler_states(job_ids)
        now = {**states, **controller_states(job_ids)}
        if not any(now.get(j) in ACTIVE_STATES for j in job_ids) or time.monotonic() > deadline:
            return states
        time.sleep(1)
