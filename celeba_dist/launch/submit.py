"""``celeba-dist submit``: one training run as a SLURM job through submitit (or ``--local``).

The launcher only translates the cluster: each SLURM task turns its environment into
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``... (:mod:`celeba_dist.launch.cluster_env`) and calls the
same ``celeba_dist.train.main(config)`` as every other launcher, imported lazily on the node.

Signals mean what SLURM means by them. ``SIGUSR2`` is the time-limit/preemption warning: SLURM
sends it ``--signal-delay`` seconds before the limit (``scancel --signal=USR2 JOB`` does the same
by hand). The training loop turns it into a checkpoint on every rank and returns
``status="preempted"``; rank 0 then calls submitit's own handler, which pickles
:meth:`TrainTask.checkpoint` and runs ``scontrol requeue``. The requeued job resumes from the run
folder's newest checkpoint. ``run.max_requeues`` bounds the requeues. ``SIGTERM`` is ``scancel``, a
node drain, or a requeue SLURM performs itself (``scontrol requeue``, PreemptMode=REQUEUE): the
loop checkpoints at the next step (SIGKILL follows after SLURM's ``KillWait``), the tasks exit 75
without a result and without requeueing; a cancelled job stays cancelled (``submit`` again on the
same folder resumes it), a job SLURM requeues resumes when SLURM restarts it.

    celeba-dist submit --config smiling_simple_cnn --data shards --run-dir runs/smile \\
        --nodes 2 --gpus-per-node 4 --cpus-per-task 8 --mem 64G --time 240 --partition gpu
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import submitit

from celeba_dist.config import add_set_argument
from celeba_dist.diskio import missing_folders, remove_empty
from celeba_dist.launch import cluster_env
from celeba_dist.launch.status import active_jobs, record_job
from celeba_dist.scheduler import ACTIVE_STATES, scheduler_states, wait_until_ended
from celeba_dist.signals import FORCE_AFTER_S

log = logging.getLogger(__name__)

LOG_SUBDIR = "slurm"  # submitit's pickles and the tasks' stdout/stderr: RUN_DIR/slurm/<job id>/


def log_folder(root: Path, *, local: bool) -> Path:
    """submitit's folder: one per SLURM job (``%j``); one for all local jobs, whose file names
    carry the process id (submitit's local controller would create a literal ``%j`` folder)."""
    return root / LOG_SUBDIR / ("local" if local else "%j")


class TrainTask:
    """What every task of the job runs: translate the cluster, train, requeue when preempted."""

    def __init__(self, *, config: str, overrides: Sequence[str], data_dir: str, run_dir: str):
        self.config = config
        self.overrides = list(overrides)
        self.data_dir = data_dir
        self.run_dir = run_dir

    def __call__(self) -> dict[str, Any]:
        cluster = cluster_env.apply()
        _stop_ends_task_until_run(cluster)
        from celeba_dist.config import load_config
        from celeba_dist.train.main import EXIT_INTERRUPTED, EXIT_PREEMPTED, interrupted, main

        cfg = load_config(self.config, self.overrides, data_dir=self.data_dir, run_dir=self.run_dir)

        def started() -> None:  # once this job holds the run folder: a job refused by the lock records nothing
            record_job(cfg.run_dir, "started", job_id=_job_id(), restart=cluster.restart_count,
                       nodelist=os.environ.get("SLURM_JOB_NODELIST"), world_size=cluster.world_size,
                       master=f"{cluster.master_addr}:{cluster.master_port}")

        try:
            result = main(cfg, on_locked=started)
        except KeyboardInterrupt:  # Ctrl-C pressed again (--local): one line, not a traceback, as `train` does
            log.warning("rank %d: %s", cluster.rank, interrupted(cfg))
            raise SystemExit(EXIT_INTERRUPTED) from None
        if result["status"] == "terminated":
            self._leave_terminated(cluster, result, EXIT_PREEMPTED)
        if result["status"] == "preempted":
            self._requeue(cluster, cfg.run.max_requeues, result)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit's requeue handler: resubmit the same task (it resumes from the run folder)."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def _leave_terminated(self, cluster: cluster_env.ClusterEnv, result: dict[str, Any], code: int) -> None:
        """After a SIGTERM checkpoint: exit without a result and without requeueing.

        SIGTERM is SLURM ending the job (``scancel``, a drain) or requeueing it itself. A result
        pickle would tell ``submit --wait`` the job is over, and a requeue would undo a cancel, so
        the task raises ``SystemExit``, which submitit's ``process_job`` lets through (it pickles
        only ``Exception``). SLURM then records the job as CANCELLED, or restarts it. Called
        outside a scheduler, the task returns the result instead.
        """
        if cluster.scheduler == "none":
            return
        if cluster.rank == 0:
            record_job(Path(self.run_dir), "terminated", job_id=_job_id(), restart=cluster.restart_count,
                       step=result["global_step"])
        log.warning("rank %d: SIGTERM, checkpoint written at step %d; exiting %d without requeueing",
                    cluster.rank, result["global_step"], code)
        raise SystemExit(code)

    def _requeue(self, cluster: cluster_env.ClusterEnv, max_requeues: int, result: dict[str, Any]) -> None:
        """After a preemption checkpoint: rank 0 requeues the job through submitit; the others leave.

        Every rank takes the same decision from the same inputs (``SLURM_RESTART_COUNT`` and the
        config), so no collective is needed after ``main`` has returned. With ``run.max_requeues``
        reached the task returns the "preempted" result, and the job ends.
        """
        if cluster.scheduler == "none":
            return
        step = result["global_step"]
        if cluster.restart_count >= max_requeues:
            log.warning("preempted after %d requeue(s): run.max_requeues=%d reached, not requeueing",
                        cluster.restart_count, max_requeues)
            if cluster.rank == 0:
                record_job(Path(self.run_dir), "preempted", job_id=_job_id(), restart=cluster.restart_count,
                           step=step, reason=f"run.max_requeues={max_requeues} reached, not requeued")
            return
        if cluster.rank != 0:
            log.info("rank %d: checkpoint written, rank 0 requeues the job", cluster.rank)
            raise SystemExit(0)  # no result file: the requeued job writes this task's result
        sig = preempt_signal()
        handler = signal.getsignal(sig)
        if not callable(handler):
            raise RuntimeError(f"no submitit handler for {sig.name}; cannot requeue (not started by submitit?)")
        record_job(Path(self.run_dir), "requeue", job_id=_job_id(), restart=cluster.restart_count, step=step)
        log.info("requeueing job %s (requeue %d of at most %d)", _job_id(), cluster.restart_count + 1, max_requeues)
        handler(sig, None)  # pickles self.checkpoint(), `scontrol requeue`s the job and exits


def _stop_ends_task_until_run(cluster: cluster_env.ClusterEnv) -> None:
    """``--local``: until ``main`` takes the stop signals (it imports torch first), a Ctrl-C or a ``kill``
    ends the task at once, as it ends a plain ``celeba-dist train``; nothing is trained yet.

    The task inherits an ignored SIGINT from its controller (:func:`controllers_ignore_sigint`), and
    submitit's own SIGTERM handler only logs the signal: either would let a run stopped in its first
    seconds train on. SLURM's tasks keep submitit's handlers (SLURM SIGKILLs after ``KillWait``).
    Not covered: a Ctrl-C in the task's very first moments, while submitit unpickles it (before this
    runs), is lost; the run then trains on until Ctrl-C is pressed again.
    """
    if cluster.scheduler == "local":
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def preempt_signal() -> signal.Signals:
    """The signal submitit's requeue handler is installed on (``SUBMITIT_PREEMPT_SIGNAL``, default USR2)."""
    return signal.Signals[f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}"]


def _job_id() -> str | None:
    """This job's id as ``sacct`` shows it (``ARRAY_INDEX`` for array members)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


# ---------------------------------------------------------------------------------------------
# Resources → executor


def add_resource_arguments(parser: argparse.ArgumentParser) -> None:
    """The SLURM options ``submit`` and ``sweep`` share."""
    group = parser.add_argument_group("resources (per job)")
    group.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    group.add_argument("--gpus-per-node", type=int, default=0,
                       help="GPUs per node, one task each; 0: CPU partition, one task per node (default 0)")
    group.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (data loader workers + 1)")
    group.add_argument("--mem", default=None, help="memory per node, SLURM syntax: 64G, 4000M")
    group.add_argument("--time", type=int, default=60, help="time limit in minutes (default 60)")
    group.add_argument("--signal-delay", type=int, default=90,
                       help="seconds before the time limit when SLURM sends USR2: checkpoint and requeue (default 90)")
    group.add_argument("--partition", default=None)
    group.add_argument("--account", default=None)
    group.add_argument("--qos", default=None)
    group.add_argument("--constraint", default=None)
    group.add_argument("--job-name", default=None, help="default: the run folder's name")
    group.add_argument("--exclusive", action="store_true", help="whole nodes for this job")
    group.add_argument("--slurm", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. mail-type=END reservation=demo (KEY alone: a flag)")
    group.add_argument("--local", action="store_true",
                       help="run on this machine with submitit's LocalExecutor (one node) instead of SLURM")
    group.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    group.add_argument("--wait", action="store_true",
                       help="block until the job ends; exit non-zero unless it completed")


def parse_slurm_options(items: Sequence[str]) -> dict[str, Any]:
    """``["mail-type=END", "overcommit"]`` → ``{"mail-type": "END", "overcommit": True}``."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise ValueError(f"--slurm {item!r}: expected KEY=VALUE or KEY")
        options[key] = value if sep else True
    return options


def slurm_parameters(args: argparse.Namespace, *, job_name: str) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters (sbatch names) for the parsed resource options."""
    if args.nodes < 1 or args.gpus_per_node < 0:
        raise ValueError("--nodes must be >= 1 and --gpus-per-node >= 0")
    if args.time < 1:  # sbatch reads --time=0 (and submitit a negative one) as no limit at all
        raise ValueError(f"--time {args.time}: the time limit must be at least 1 minute")
    if not 0 <= args.signal_delay < args.time * 60:  # else every start gets USR2 at once and requeues
        raise ValueError(f"--signal-delay {args.signal_delay}: must be >= 0 and under --time "
                         f"({args.time} min = {args.time * 60} s)")
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": args.nodes,
        "ntasks_per_node": max(args.gpus_per_node, 1),
        "time": args.time,
        "signal_delay_s": args.signal_delay,
        # a failing task ends the step at once instead of leaving its peers in a collective
        "srun_args": ["--kill-on-bad-exit=1"],
        "additional_parameters": {"requeue": True, **parse_slurm_options(args.slurm)},
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    optional = {"cpus_per_task": args.cpus_per_task, "mem": args.mem, "partition": args.partition,
                "account": args.account, "qos": args.qos, "constraint": args.constraint}
    params.update({k: v for k, v in optional.items() if v is not None})
    if args.exclusive:
        params["exclusive"] = True
    return params


def build_executor(args: argparse.Namespace, folder: Path, *, params: dict[str, Any],
                   max_requeues: int) -> submitit.Executor:
    """A SLURM executor with ``params`` (:func:`slurm_parameters`), or a LocalExecutor with ``--local``."""
    if args.local:
        if args.nodes != 1:
            raise ValueError("--local runs on this machine: --nodes must be 1")
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=max_requeues)
        executor.update_parameters(tasks_per_node=max(args.gpus_per_node, 1), gpus_per_node=args.gpus_per_node,
                                   timeout_min=args.time, signal_delay_s=args.signal_delay)
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
    executor.update_parameters(**params)
    return executor


@contextlib.contextmanager
def controllers_ignore_sigint(*, local: bool) -> Iterator[None]:
    """With ``local``, the submissions made in the block start submitit's local controller with SIGINT ignored.

    A terminal's Ctrl-C goes to its whole foreground process group: ``submit``, the controller and its
    tasks. submitit's controller takes it as a ``KeyboardInterrupt`` and ends its tasks with a SIGINT and,
    one second later, a SIGKILL (``Controller.kill_tasks`` in ``submitit/local/local.py``): usually before
    the run's checkpoint. submitit has no parameter for that second, nor for the controller's process
    group; but a signal ignored stays ignored across ``exec``, and Python leaves an ignored SIGINT alone
    as it starts. So the controller sits a Ctrl-C out, while its tasks (which take SIGINT back, see
    :meth:`TrainTask.__call__`) get it from the terminal, checkpoint and exit 75; ``submit --wait`` asks
    them with a SIGTERM too and waits (:func:`stop_local`). A SIGTERM (``kill``) still reaches the tasks
    through the controller; submitit's ``LocalJob.cancel`` (a SIGINT) no longer does.
    """
    if not local or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def sbatch_script(params: dict[str, Any], folder: Path, *, array_size: int | None = None) -> str:
    """The sbatch script a submission with ``params`` would use, without submitting (``--dry-run``).

    submitit has no public call for this text; ``_make_sbatch_string`` is the function its
    ``SlurmExecutor`` uses, so the script printed is the one ``sbatch`` would get (it also works
    where SLURM is not installed, unlike constructing the executor).
    """
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size, **params)


# How often ``--wait`` asks the scheduler (submitit's own watcher slows down to every few minutes).
POLL_S = 5


def wait_for(jobs: Sequence[submitit.Job]) -> list[dict[str, Any] | None]:
    """Block until the jobs end; rank 0's result of each, or None where the job failed or was cancelled.

    A job that SLURM requeues (``scontrol requeue``, a preemption) passes through REQUEUED and
    PENDING and runs again: that is still waiting, not a failure.
    """
    slurm = all(isinstance(job, submitit.SlurmJob) for job in jobs)
    ended = {job.job_id: _wait_slurm(job) for job in jobs} if slurm else {}
    if slurm:  # the tasks are gone; sacct and `jobs` agree; the state polled before the result may be stale
        final = wait_until_ended([job.job_id for job in jobs])
        ended.update({job_id: final[job_id] for job_id in ended if final.get(job_id)})
    results: list[dict[str, Any] | None] = []
    for job in jobs:
        if ended.get(job.job_id) == "CANCELLED":
            finished = _finished_result(job)
            if finished is None:
                print(f"job {job.job_id} was cancelled: it is not requeued; its run folder keeps the newest "
                      "checkpoint, and `celeba-dist submit` with the same --run-dir resumes it", file=sys.stderr)
            else:
                print(f"job {job.job_id} was cancelled after its run had finished: the results are whole",
                      file=sys.stderr)
            results.append(finished)
            continue
        try:
            results.append(job.results()[0])
        except submitit.core.utils.UncompletedJobError as exc:  # FailedJobError included
            state = f" ({ended[job.job_id]})" if ended.get(job.job_id) else ""
            print(f"job {job.job_id} failed{state}: {failure_line(exc)}; log: {job.paths.stderr}",
                  file=sys.stderr)
            results.append(None)
    return results


def _finished_result(job: submitit.Job) -> dict[str, Any] | None:
    """Rank 0's result of a cancelled job whose run had finished (a scancel in its last moments), else None
    (a run the cancel stopped also leaves a result: ``status`` tells them apart)."""
    try:
        result = job.results()[0]
    except submitit.core.utils.UncompletedJobError:
        return None
    return result if isinstance(result, dict) and result.get("status") == "completed" else None


def failure_line(exc: Exception) -> str:
    """The task's own error from submitit's report: the first line of the exception its traceback
    ends with (a message may go on over several lines), not the whole report."""
    lines = str(exc).splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    after = lines[frames[-1] + 1:] if frames else []
    return next((line.strip() for line in after if line.strip() and not line.startswith(" ")),
                next((line.strip() for line in reversed(lines) if line.strip()), str(exc)))


def stopped_waiting(jobs: Sequence[submitit.Job], status: str) -> int:
    """Ctrl-C while ``--wait`` waits: SLURM jobs are left as they are; local jobs checkpoint and stop
    (:func:`stop_local`). Say how to follow, cancel or resume them; exit 130, as a launcher does."""
    ids = " ".join(job.job_id for job in jobs)
    if all(isinstance(job, submitit.SlurmJob) for job in jobs):
        where = f"they keep running on the cluster; `scancel {ids}` cancels them (each checkpoints first)"
        print(f"stopped waiting for job(s) {ids}: {where}; `{status}` shows them", file=sys.stderr)
        return 130
    outcome = stop_local(jobs)
    resume = "the same command resumes from the newest checkpoint"
    where = {"stopped": f"job(s) {ids} ended: a run the Ctrl-C stopped checkpointed the step it had reached "
                        f"first; {resume}",
             "again": f"stopped waiting for job(s) {ids}: Ctrl-C again stops them at once, without a checkpoint "
                      f"of now; once they have ended {resume}",
             "timeout": f"stopped waiting for job(s) {ids} after {LOCAL_STOP_S} s: they are still stopping (a "
                        f"checkpoint first); `kill {ids}` asks again; once they have ended {resume}"}[outcome]
    print(f"{where}; `{status}` shows them", file=sys.stderr)
    return 130


# How long Ctrl-C on ``--local --wait`` waits for the local jobs to checkpoint and end; a second Ctrl-C
# (FORCE_AFTER_S or more after the first, as the run counts it) stops the waiting at once.
LOCAL_STOP_S = 300


def stop_local(jobs: Sequence[submitit.Job], *, timeout_s: float = LOCAL_STOP_S) -> str:
    """After a Ctrl-C: ask the local jobs to checkpoint and stop, and wait for them to end. Returns
    "stopped" (all ended), "again" (Ctrl-C pressed again) or "timeout" (still running after ``timeout_s``).

    The terminal's Ctrl-C reaches the tasks themselves (their controllers ignore it, see
    :func:`controllers_ignore_sigint`): each checkpoints at its next step and exits 75. A SIGTERM to each
    controller, which forwards it to its tasks, brings the same stop to tasks the Ctrl-C did not reach
    (a SIGINT sent to ``submit`` alone); a run takes the two as one stop. Ctrl-C pressed again, 2 s or
    more after the first, stops the tasks at once without that checkpoint, and this wait with them.
    """
    running = [job for job in jobs if not job.done()]
    for job in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(job.job_id), signal.SIGTERM)
    if running:
        print(f"Ctrl-C: job(s) {' '.join(job.job_id for job in running)} checkpoint at their next step and stop; "
              f"waiting up to {timeout_s:.0f} s (Ctrl-C again stops them at once, without that checkpoint)",
              file=sys.stderr)
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if all(job.done() for job in running):
                return "stopped"
            time.sleep(0.2)
        except KeyboardInterrupt:  # within FORCE_AFTER_S: the same Ctrl-C for the run too, keep waiting
            if time.monotonic() - start >= FORCE_AFTER_S:
                return "again"
    return "timeout"


def _wait_slurm(job: submitit.SlurmJob) -> str | None:
    """Poll until rank 0's result is written or the scheduler has ended the job; its last state.

    A job the scheduler knew and then forgets (no accounting, ``MinJobAge`` passed) has ended.
    """
    result = job.task(0).paths.result_pickle
    state, seen = None, False
    while not result.exists():
        state = scheduler_states([job.job_id]).get(job.job_id)
        if state is None and seen:
            return "UNKNOWN"
        if state is not None and state not in ACTIVE_STATES:
            return state
        seen = seen or state is not None
        time.sleep(POLL_S)
    return state


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="celeba-dist submit", description=__doc__.splitlines()[0].replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--config", required=True, help="a shipped recipe name or a YAML file")
    parser.add_argument("--data", required=True, type=Path, help="the packed shards folder (manifest.json inside)")
    parser.add_argument("--run-dir", required=True, type=Path, help="the run folder (checkpoints, logs, TensorBoard)")
    add_set_argument(parser, "dotted config overrides")
    add_resource_arguments(parser)
    return parser


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run folder that cannot be made here (under a file, or not writable) before anything is queued."""
    run_dir = run_dir.resolve()
    existing = next(p for p in [run_dir, *run_dir.parents] if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--run-dir {run_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--run-dir {run_dir}: {existing} is not writable")


def check_runs_free(run_dirs: Sequence[Path], *, stale_s: float) -> None:
    """One run per folder: refuse a folder whose lock a live run holds, or whose last job is still
    queued or running. That job takes the lock only once it starts: a second job queued meanwhile
    would stop on the lock (or take the folder from the pending one), and ``jobs`` would show only it.
    Reads ``slurm_jobs.json``, so a damaged one is refused here, before anything is queued."""
    from celeba_dist import runlock

    for run_dir in run_dirs:
        holder = runlock.live_holder(run_dir, stale_s=stale_s)
        if holder is not None:  # its tasks would stop at once
            raise ValueError(runlock.locked_message(run_dir, holder, stale_s=stale_s))
    active = active_jobs(list(run_dirs))
    if active:
        run_dir, (job_id, state) = next(iter(active.items()))
        more = f" (and {len(active) - 1} more folder(s))" if len(active) > 1 else ""
        ids = " ".join(job for job, _ in active.values())
        how = f"kill {ids}" if state.endswith("(local)") else f"scancel {ids}"
        raise ValueError(f"run folder {run_dir} already has job {job_id} ({state}){more}: one run per folder; "
                         f"wait for it to end, or cancel it: {how}")


class SubmitLocks:
    """One submission per folder at a time: ``RUN/.submit.lock`` is held from the folder check until the job is
    recorded in ``slurm_jobs.json``, so two submits started together cannot both find the folder free and
    queue two jobs for it. Raises ValueError naming the other submit. A submission that fails removes the
    folders it created, when they are still empty."""

    def __init__(self, run_dirs: Sequence[Path], *, stale_s: float) -> None:
        from celeba_dist import runlock

        self._created = [missing_folders(Path(d)) for d in run_dirs]
        self._locks: list[Any] = []
        try:
            for run_dir in sorted(set(run_dirs)):  # one order everywhere: two sweeps cannot hold a folder each
                self._locks.append(runlock.acquire(run_dir, stale_s=stale_s, user=runlock.SUBMIT))
        except BaseException as exc:
            self.release(failed=True)
            if isinstance(exc, runlock.RunLockedError):
                raise ValueError(str(exc)) from None
            raise

    @contextlib.contextmanager
    def released_on_failure(self) -> Iterator[None]:
        """The checks and the queueing: an exception releases the locks (and removes the folders made)."""
        try:
            yield
        except BaseException:
            self.release(failed=True)
            raise

    def release(self, *, failed: bool) -> None:
        while self._locks:
            self._locks.pop().release()
        if failed:  # each list ends at its topmost new folder: a sweep's own goes with its last member's
            for created in self._created:
                remove_empty(created)


@contextlib.contextmanager
def sbatch_refusal(folder: Path) -> Iterator[None]:
    """sbatch's refusal (a bad partition or option) as a one-line ValueError; the submission script
    and task pickles submitit wrote for it are removed, since no job will ever read them. submitit
    also prints sbatch's stderr on a refusal: held back here, and passed on only when sbatch accepts."""
    root = folder.parent if "%j" in folder.name else folder  # where submitit writes before the job id
    before = set(root.iterdir()) if root.is_dir() else set()
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
        sys.stderr.write(held.getvalue())
    except submitit.core.utils.FailedJobError as exc:
        for path in (set(root.iterdir()) if root.is_dir() else set()) - before:
            if path.suffix == ".pkl" or path.name.startswith(".submission_file_"):
                path.unlink(missing_ok=True)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ValueError(f"sbatch refused the job: {'; '.join(lines)}") from None


def check_data(data: Path) -> None:
    """Fail before queueing when the shards are not there (the nodes would fail after waiting)."""
    if not (data / "manifest.json").is_file():
        raise ValueError(f"{data} holds no manifest.json; pack shards first: celeba-dist pack SOURCE {data}")


def check_resumable(cfg: Any) -> None:
    """Refuse before queueing a run the job would refuse at its start: a resume with settings its checkpoint
    overrides or other shards, a fresh start over checkpoints, a ``run.resume`` file that does not load."""
    ckpt_dir = cfg.run_dir / "checkpoints"
    if cfg.run.resume == "auto" and not (ckpt_dir.is_dir() and any(ckpt_dir.glob("step-*.pt"))):
        return  # a new run: nothing to compare (and no torch import on the login node)
    from celeba_dist.safeload import UnsafeFileError
    from celeba_dist.train.main import check_resumable as refuse_unresumable

    try:
        refuse_unresumable(cfg)
    except UnsafeFileError as exc:
        raise ValueError(str(exc)) from None


def resolve_task(config: str, overrides: Sequence[str], data: Path, run_dir: Path) -> tuple[TrainTask, Any]:
    """Validate the config here, before anything is queued; the task carries absolute paths."""
    from celeba_dist.config import load_config

    check_run_dir(run_dir)
    is_file = Path(config).suffix in (".yaml", ".yml") or Path(config).exists()
    config_arg = str(Path(config).resolve()) if is_file else config  # the job may start in another folder
    task = TrainTask(config=config_arg, overrides=overrides, data_dir=str(data.resolve()),
                     run_dir=str(run_dir.resolve()))
    cfg = load_config(task.config, task.overrides, data_dir=task.data_dir, run_dir=task.run_dir)
    return task, cfg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dry_run and args.local:
        parser.error("--dry-run prints the sbatch script: it has no meaning with --local")
    from celeba_dist.config import ConfigError

    try:
        task, cfg = resolve_task(args.config, args.set, args.data, args.run_dir)
        params = slurm_parameters(args, job_name=args.job_name or cfg.run_dir.name)
        folder = log_folder(cfg.run_dir, local=args.local)
        if args.dry_run:
            print(sbatch_script(params, folder))
            return 0
        locks = SubmitLocks([cfg.run_dir], stale_s=cfg.run.lock_stale_s)
        with locks.released_on_failure():
            check_runs_free([cfg.run_dir], stale_s=cfg.run.lock_stale_s)
            check_data(args.data)
            check_resumable(cfg)
            executor = build_executor(args, folder, params=params, max_requeues=cfg.run.max_requeues)
            with sbatch_refusal(folder), controllers_ignore_sigint(local=args.local):
                job = executor.submit(task)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"celeba-dist submit: error: {exc}", file=sys.stderr)
        return 2
    try:
        record_job(cfg.run_dir, "submitted", job_id=job.job_id, executor="local" if args.local else "slurm",
                   nodes=args.nodes, gpus_per_node=args.gpus_per_node, log_dir=str(job.paths.folder),
                   command=" ".join(map(shlex.quote, ["celeba-dist", "submit", *(argv or sys.argv[1:])])))
    finally:
        locks.release(failed=False)
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {max(args.gpus_per_node, 1)} task(s)")
    print(f"  run folder:  {cfg.run_dir}")
    print(f"  logs:        {job.paths.stdout.parent}")
    print(f"  status:      celeba-dist jobs --run-dir {cfg.run_dir}")
    print(f"  TensorBoard: tensorboard --logdir {cfg.run_dir}")
    return wait_and_report(job, cfg) if args.wait else 0


def wait_and_report(job: submitit.Job, cfg: Any) -> int:
    """``--wait``: 0 once the job completed, 130 on Ctrl-C (a SLURM job stays, a local one checkpoints and
    stops), else 1."""
    try:
        result = wait_for([job])[0]
    except KeyboardInterrupt:
        return stopped_waiting([job], f"celeba-dist jobs --run-dir {cfg.run_dir}")
    if result is None:
        return 1
    print(f"job {job.job_id}: {result['status']} at step {result['global_step']}, best {result['best']}")
    if result["status"] == "preempted":
        print(f"job {job.job_id} was preempted and not requeued (run.max_requeues={cfg.run.max_requeues} reached); "
              "the same command resumes it from its newest checkpoint", file=sys.stderr)
    return 0 if result["status"] == "completed" else 1
