"""The launch layer's refusals that need no cluster: bad resource values, a run folder that cannot be
made, damaged ``slurm_jobs.json`` files; each a one-line error with exit 2 before anything is queued."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import submitit

from celeba_dist import runlock
from celeba_dist.launch.status import main as status_main, record_job, run_state
from celeba_dist.launch.submit import failure_line, main as submit_main
from celeba_dist.launch.sweep import main as sweep_main


def _data(tmp_path: Path) -> Path:
    """A folder that passes submit's shard check (a manifest.json); nothing here reads the shards."""
    data = tmp_path / "shards"
    data.mkdir(exist_ok=True)
    (data / "manifest.json").write_text("{}")
    return data


def _submit(tmp_path: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", "smiling_simple_cnn", "--data", str(_data(tmp_path)), "--run-dir", str(run_dir), *extra]


def _sweep(tmp_path: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*_submit(tmp_path, run_dir, *extra), "--grid", "optim.lr=1e-3,3e-4"]


def _one_line_error(capsys, prog: str = "submit") -> str:
    captured = capsys.readouterr()
    assert captured.err.startswith(f"celeba-dist {prog}: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize("extra, named", [
    (["--time", "1"], "--signal-delay 90"),  # the default delay: USR2 at every start
    (["--time", "-5"], "--time -5"),  # would be no limit at all
    (["--time", "0"], "--time 0"),
    (["--time", "10", "--signal-delay", "-5"], "--signal-delay -5"),
    (["--time", "2", "--signal-delay", "120"], "--signal-delay 120"),
])
def test_resource_values_are_checked(capsys, tmp_path, extra, named):
    assert submit_main([*_submit(tmp_path, tmp_path / "run", *extra), "--dry-run"]) == 2
    assert named in _one_line_error(capsys)
    assert sweep_main([*_sweep(tmp_path, tmp_path / "sw", *extra), "--dry-run"]) == 2
    assert named in _one_line_error(capsys, "sweep")


def test_resource_values_in_range_pass(capsys, tmp_path):
    assert submit_main([*_submit(tmp_path, tmp_path / "run", "--time", "2", "--signal-delay", "119"),
                        "--dry-run"]) == 0
    assert "#SBATCH --signal=USR2@119" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_run_dir_under_a_file_is_refused(capsys, tmp_path, dry_run):
    under_file = _data(tmp_path) / "manifest.json" / "run"
    assert submit_main([*_submit(tmp_path, under_file), *dry_run]) == 2
    assert "manifest.json is a file, not a folder" in _one_line_error(capsys)
    assert sweep_main([*_sweep(tmp_path, under_file), *dry_run]) == 2
    assert "manifest.json is a file, not a folder" in _one_line_error(capsys, "sweep")


@pytest.mark.parametrize("text", ["", '{"a": 1}', "[1, 2]", '[{"event": "submitted"}]', '[{"event": "start'])
def test_damaged_job_records_are_refused_before_queueing(capsys, tmp_path, text):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "slurm_jobs.json").write_text(text)
    assert submit_main(_submit(tmp_path, run_dir, "--time", "5")) == 2
    assert f"{run_dir / 'slurm_jobs.json'} " in _one_line_error(capsys)
    assert not (run_dir / "slurm").exists()  # nothing was handed to sbatch
    assert (run_dir / "slurm_jobs.json").read_text() == text


def test_jobs_lists_the_other_runs_beside_a_damaged_one(capsys, tmp_path):
    record_job(tmp_path / "good", "submitted", job_id="999999", executor="slurm")
    for name, text in (("empty", ""), ("dict", '{"a": 1}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "slurm_jobs.json").write_text(text)
    assert status_main(["--run-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    rows = {line.split()[0]: line.split()[1:3] for line in captured.out.splitlines()[1:4]}
    assert rows == {"dict": ["-", "UNREADABLE"], "empty": ["-", "UNREADABLE"], "good": ["999999", "UNKNOWN"]}
    errors = captured.err.splitlines()
    assert len(errors) == 2 and "Traceback" not in captured.err
    assert all(line.startswith("celeba-dist jobs: error: ") for line in errors)
    assert {str(tmp_path / name / "slurm_jobs.json") for name in ("dict", "empty")} == {
        line.split()[3] for line in errors}


def test_a_damaged_sweep_member_does_not_hide_the_sweep(capsys, tmp_path):
    sweep = tmp_path / "sw"
    members = [{"name": n, "config": "smiling_simple_cnn", "overrides": [], "run_dir": str(sweep / n),
                "job_id": "999999_0"} for n in ("a", "b")]
    record_job(sweep / "a", "submitted", job_id="999999_0", executor="slurm")
    (sweep / "b").mkdir()
    (sweep / "b" / "slurm_jobs.json").write_text("[")
    (sweep / "sweep.json").write_text(json.dumps({"members": members}))
    assert status_main(["--run-dir", str(tmp_path), "--sweep", "sw"]) == 1
    captured = capsys.readouterr()
    assert {line.split()[0]: line.split()[2] for line in captured.out.splitlines()[1:3]} == {
        "a": "UNKNOWN", "b": "UNREADABLE"}
    assert str(sweep / "b" / "slurm_jobs.json") in captured.err


def test_failure_line_is_the_tasks_own_error():
    trace = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n    main()\n"
             "  File \"y.py\", line 2, in main\n    raise ShardError(problems)\n"
             "celeba_dist.data.streams.ShardError: shard train-000003.tar is missing\n  train-000003.tar: gone")
    exc = submitit.core.utils.FailedJobError(
        f"Job (task=0) failed during processing with trace:\n----------------------\n{trace}\n"
        "----------------------\nYou can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n"
        "  - /r/slurm/7/7_0_log.err\n  - /r/slurm/7/7_0_log.out")
    assert failure_line(exc) == "celeba_dist.data.streams.ShardError: shard train-000003.tar is missing"
    assert failure_line(submitit.core.utils.UncompletedJobError("Job 7 (task: 0) with path x\nhas not produced "
                                                                "any output (state: CANCELLED)")) == \
        "has not produced any output (state: CANCELLED)"


def test_a_job_cancelled_after_its_run_finished_shows_completed():
    started = {"event": "started"}
    assert run_state("CANCELLED", [started], finished=True) == "COMPLETED(cancelled after finishing)"
    assert run_state("CANCELLED", [started], finished=False) == "CANCELLED"


def _fake_slurm_clients(tmp_path: Path, monkeypatch, sacct_output: str) -> None:
    """`sacct` printing recorded --parsable2 text, and an `scontrol` that knows no job (as after MinJobAge)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct.txt").write_text(sacct_output)
    (bin_dir / "sacct").write_text(f"#!/bin/sh\ncat {bin_dir / 'sacct.txt'}\n")
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    for name in ("sacct", "scontrol"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_jobs_reads_sacct_states_and_array_members(capsys, tmp_path, monkeypatch):
    """sacct's own text: "CANCELLED by 0" is CANCELLED, a pending array range counts for each member."""
    from celeba_dist.scheduler import scheduler_states

    _fake_slurm_clients(tmp_path, monkeypatch, "1234|CANCELLED by 0\n1240_0|COMPLETED\n1240_[1-2%2]|PENDING\n"
                                               "1250|RUNNING\n")
    assert scheduler_states(["1234", "1240_0", "1240_1", "1240_2", "1250"]) == {
        "1234": "CANCELLED", "1240_0": "COMPLETED", "1240_1": "PENDING", "1240_2": "PENDING", "1250": "RUNNING"}
    runs = tmp_path / "runs"
    record_job(runs / "cancelled", "submitted", job_id="1234", executor="slurm")
    record_job(runs / "cancelled", "started", job_id="1234", restart=0)
    record_job(runs / "queued", "submitted", job_id="1240_2", executor="slurm")
    assert status_main(["--run-dir", str(runs)]) == 0
    rows = {line.split()[0]: line.split()[1:4] for line in capsys.readouterr().out.splitlines()[1:3]}
    assert rows == {"cancelled": ["1234", "CANCELLED", "1"], "queued": ["1240_2", "PENDING", "0"]}


@pytest.mark.parametrize("state", ["PENDING", "REQUEUED", "RUNNING"])
def test_a_folder_whose_job_is_queued_or_running_is_refused(capsys, tmp_path, monkeypatch, state):
    """One run per folder before the job holds the run lock: a job still queued (or requeued and queued
    again) keeps its folder, and so does a sweep's, even against a new sweep with other member names."""
    _fake_slurm_clients(tmp_path, monkeypatch, f"1250|{state}\n1240_0|COMPLETED\n1240_1|{state}\n")
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: not on this test' >&2\nexit 1\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)  # a submission that got past the check queues nothing
    run_dir = tmp_path / "run"
    record_job(run_dir, "submitted", job_id="1250", executor="slurm")
    assert submit_main(_submit(tmp_path, run_dir, "--time", "5")) == 2
    err = _one_line_error(capsys)
    assert f"already has job 1250 ({state})" in err and "scancel 1250" in err, err
    assert [r["event"] for r in json.loads((run_dir / "slurm_jobs.json").read_text())] == ["submitted"]
    sweep = tmp_path / "sw"
    members = [{"name": n, "config": "smiling_simple_cnn", "overrides": [], "run_dir": str(sweep / n),
                "job_id": f"1240_{i}"} for i, n in enumerate(("old-a", "old-b"))]
    for member in members:
        record_job(sweep / member["name"], "submitted", job_id=member["job_id"], executor="slurm")
    (sweep / "sweep.json").write_text(json.dumps({"members": members}))
    assert sweep_main(_sweep(tmp_path, sweep, "--time", "5")) == 2  # members 00-lr1e-3, 01-lr3e-4: new folders
    assert f"already has job 1240_1 ({state})" in _one_line_error(capsys, "sweep")
    assert json.loads((sweep / "sweep.json").read_text()) == {"members": members}
    assert not (sweep / "slurm").exists()
    assert sorted(p.name for p in sweep.iterdir()) == ["old-a", "old-b", "sweep.json"]  # no new member folder left


def _fake_sbatch(tmp_path: Path, job_id: str) -> None:
    (tmp_path / "bin" / "sbatch").write_text(f"#!/bin/sh\necho 'Submitted batch job {job_id}'\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)


def test_a_folder_another_submit_is_queueing_into_is_refused_by_name(capsys, tmp_path, monkeypatch):
    """Two submits (or sweeps) of one folder started together: each holds RUN/.submit.lock from its folder check
    until its job is recorded, so the second cannot also find the folder free. It is refused naming the
    first, queues nothing and leaves the folders as they were; once the first has recorded its job, a new
    submit is refused for that job."""
    _fake_slurm_clients(tmp_path, monkeypatch, "1250|PENDING\n")
    _fake_sbatch(tmp_path, "1250")
    run_dir, sweep = tmp_path / "run", tmp_path / "sw"
    # another submit and another sweep, each between its folder check and its job's record
    others = [runlock.acquire(d, stale_s=600, user=runlock.SUBMIT) for d in (run_dir, sweep / "01-lr3e-4")]
    try:
        assert submit_main(_submit(tmp_path, run_dir, "--time", "5")) == 2
        err = _one_line_error(capsys)
        assert f"run folder {run_dir.resolve()} is in use by another submit: pid {os.getpid()} on host" in err, err
        assert f"delete {run_dir.resolve() / '.submit.lock'} only if" in err, err
        assert sweep_main(_sweep(tmp_path, sweep, "--time", "5")) == 2
        assert f"{sweep.resolve() / '01-lr3e-4'} is in use by another submit" in _one_line_error(capsys, "sweep")
        assert [p.name for p in run_dir.iterdir()] == [".submit.lock"]
        assert [p.name for p in sweep.iterdir()] == ["01-lr3e-4"]  # member 00's folder, made for its lock, is gone
    finally:
        for lock in others:
            lock.release()
    assert submit_main(_submit(tmp_path, run_dir, "--time", "5")) == 0
    capsys.readouterr()
    assert [(r["event"], r["job_id"]) for r in json.loads((run_dir / "slurm_jobs.json").read_text())] == [
        ("submitted", "1250")]
    assert not (run_dir / ".submit.lock").exists()  # released once the job was recorded
    assert submit_main(_submit(tmp_path, run_dir, "--time", "5")) == 2
    assert "already has job 1250 (PENDING)" in _one_line_error(capsys)


def test_a_refused_submission_leaves_no_folder_it_made(capsys, tmp_path):
    """The submit lock makes the run folder; a submission refused after that (here: no shards) removes it."""
    no_shards = tmp_path / "empty"
    no_shards.mkdir()
    run_dir = tmp_path / "new" / "deeper" / "run"
    args = ["--config", "smiling_simple_cnn", "--data", str(no_shards), "--run-dir", str(run_dir)]
    assert submit_main(args) == 2
    assert "holds no manifest.json" in _one_line_error(capsys)
    assert sweep_main([*args, "--grid", "optim.lr=1e-3,3e-4"]) == 2
    assert "holds no manifest.json" in _one_line_error(capsys, "sweep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_jobs_asks_the_controller_while_sacct_still_says_requeued(capsys, tmp_path, monkeypatch):
    """After a requeue sacct says REQUEUED for a while when the controller has the job PENDING again, and
    RUNNING while the controller is already COMPLETING it: the controller's state is the one shown."""
    _fake_slurm_clients(tmp_path, monkeypatch, "1250|REQUEUED\n1260|RUNNING\n1270|COMPLETED\n")
    (tmp_path / "bin" / "scontrol").write_text(
        "#!/bin/sh\ncase \"$4\" in\n"
        "1250) echo 'JobId=1250 JobName=a JobState=PENDING Reason=BeginTime Restarts=1';;\n"
        "1260) echo 'JobId=1260 JobName=b JobState=COMPLETING Restarts=0';;\n"
        "*) echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1;;\nesac\n")
    from celeba_dist.scheduler import scheduler_states

    assert scheduler_states(["1250", "1260", "1270"]) == {"1250": "PENDING", "1260": "COMPLETING",
                                                         "1270": "COMPLETED"}
    runs = tmp_path / "runs"
    record_job(runs / "requeued", "submitted", job_id="1250", executor="slurm")
    record_job(runs / "requeued", "started", job_id="1250", restart=0)
    record_job(runs / "requeued", "requeue", job_id="1250", restart=0, step=6)
    assert status_main(["--run-dir", str(runs)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:4] == ["requeued", "1250", "PENDING(requeued)", "1"], row


def test_submit_wait_keeps_waiting_through_a_requeue(tmp_path, monkeypatch):
    """--wait on a job SLURM requeues: REQUEUED and PENDING again are still waiting, and so is a job the
    scheduler does not know yet; the job's end is what ends the wait (sacct answering a new state at
    each poll, as during a preemption)."""
    from celeba_dist.launch import submit

    _fake_slurm_clients(tmp_path, monkeypatch, "")
    states = tmp_path / "bin" / "states"
    states.write_text("\nRUNNING\nREQUEUED\nPENDING\nRUNNING\nCOMPLETED\n")  # not known yet at the first poll
    (tmp_path / "bin" / "sacct").write_text(  # the next state at each call, the last one for good
        f"#!/bin/sh\nstate=$(head -n 1 {states})\necho \"1250|$state\"\n"
        f"[ $(wc -l < {states}) -gt 1 ] && sed -i 1d {states}\nexit 0\n")
    monkeypatch.setattr(submit, "POLL_S", 0)
    job = submitit.SlurmJob(folder=tmp_path / "slurm" / "%j", job_id="1250")
    assert submit._wait_slurm(job) == "COMPLETED"
    assert states.read_text() == "COMPLETED\n"


def test_the_submitted_job_may_requeue_as_often_as_run_max_requeues(capsys, tmp_path, monkeypatch):
    """A week-long job: submitit's own count of time-limit requeues (its handler refuses a requeue past
    it, whatever the task decides) is run.max_requeues, in the pickle the job loads, not submitit's 3."""
    _fake_slurm_clients(tmp_path, monkeypatch, "")
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\necho 'Submitted batch job 1250'\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    run_dir = tmp_path / "week"
    assert submit_main(_submit(tmp_path, run_dir, "--time", "600", "--set", "run.max_requeues=20")) == 0
    assert "submitted job 1250" in capsys.readouterr().out
    delayed = submitit.helpers.DelayedSubmission.load(run_dir / "slurm" / "1250" / "1250_submitted.pkl")
    assert delayed._timeout_countdown == 20
    assert delayed.function.run_dir == str(run_dir.resolve()) and delayed.function.overrides == ["run.max_requeues=20"]
    assert [(r["event"], r["job_id"], r["executor"]) for r in json.loads((run_dir / "slurm_jobs.json").read_text())] \
        == [("submitted", "1250", "slurm")]


def test_submit_wait_returns_once_the_cancelled_tasks_are_gone(tmp_path, monkeypatch):
    """sacct says CANCELLED at once while the controller still lets the tasks checkpoint (COMPLETING):
    --wait waits for the controller, so that its answer holds (no task left to requeue or write)."""
    from celeba_dist.scheduler import wait_until_ended

    _fake_slurm_clients(tmp_path, monkeypatch, "1250|CANCELLED by 0\n")
    states = tmp_path / "bin" / "controller"
    states.write_text("COMPLETING\nCOMPLETING\nCANCELLED\n")
    (tmp_path / "bin" / "scontrol").write_text(  # the next state at each call, the last one for good
        f"#!/bin/sh\necho \"JobId=1250 JobName=a JobState=$(head -n 1 {states}) Restarts=0\"\n"
        f"[ $(wc -l < {states}) -gt 1 ] && sed -i 1d {states}\nexit 0\n")
    assert wait_until_ended(["1250"], timeout_s=30) == {"1250": "CANCELLED"}
    assert states.read_text() == "CANCELLED\n"


def test_each_sweep_member_records_its_own_array_task(capsys, tmp_path, monkeypatch):
    """A sweep is one job array: each member's run folder records its own ARRAY_INDEX job id, so that
    `jobs --sweep` shows each member's own state (here member 1 still running while member 0 is done)."""
    _fake_slurm_clients(tmp_path, monkeypatch, "1250_0|COMPLETED\n1250_1|RUNNING\n")
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\necho 'Submitted batch job 1250'\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    sweep = tmp_path / "sw"
    assert sweep_main(_sweep(tmp_path, sweep, "--time", "5")) == 0
    assert "submitted 2 member(s) as job array 1250" in capsys.readouterr().out
    names = ["00-lr1e-3", "01-lr3e-4"]
    assert [(m["name"], m["job_id"]) for m in json.loads((sweep / "sweep.json").read_text())["members"]] == [
        (names[0], "1250_0"), (names[1], "1250_1")]
    for i, name in enumerate(names):
        assert [(r["event"], r["job_id"]) for r in json.loads((sweep / name / "slurm_jobs.json").read_text())] == [
            ("submitted", f"1250_{i}")]
    assert status_main(["--run-dir", str(tmp_path), "--sweep", "sw"]) == 0
    rows = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()[1:3]}
    assert rows == {names[0]: ["1250_0", "COMPLETED"], names[1]: ["1250_1", "RUNNING"]}


def test_a_sweep_checks_every_member_folder_before_queueing(capsys, tmp_path, monkeypatch):
    """run.resume=none over a member folder that holds checkpoints (here the second member's) would mix two
    runs: the sweep is refused naming that folder, before sbatch, and the first member's check alone
    does not let it through."""
    _fake_slurm_clients(tmp_path, monkeypatch, "")
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\necho 'Submitted batch job 1250'\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    sweep = tmp_path / "sw"
    (sweep / "01-lr3e-4" / "checkpoints").mkdir(parents=True)
    (sweep / "01-lr3e-4" / "checkpoints" / "step-000000006.pt").write_bytes(b"")
    assert sweep_main(_sweep(tmp_path, sweep, "--time", "5", "--set", "run.resume=none")) == 2
    err = _one_line_error(capsys, "sweep")
    assert f"run.resume=none: {sweep.resolve() / '01-lr3e-4'} already holds checkpoints" in err, err
    assert not (sweep / "sweep.json").exists() and not (sweep / "slurm").exists()


def test_the_submit_lock_of_a_killed_submit_is_taken_over_naming_it(caplog, tmp_path, monkeypatch):
    """A submit killed between its folder check and its job's record leaves RUN/.submit.lock behind: the next
    submit takes it over (its pid is dead on this host), says which lock and whose, and queues."""
    _fake_slurm_clients(tmp_path, monkeypatch, "1250|PENDING\n")
    _fake_sbatch(tmp_path, "1250")
    run_dir = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, sys; from celeba_dist import runlock; "
        "runlock.acquire(sys.argv[1], stale_s=600, user=runlock.SUBMIT); os.kill(os.getpid(), 9)"), str(run_dir)],
        capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    dead = runlock.read_holder(run_dir / ".submit.lock")
    assert dead is not None and not runlock.pid_alive(dead.pid)
    with caplog.at_level(logging.WARNING):
        assert submit_main(_submit(tmp_path, run_dir, "--time", "5")) == 0
    said = caplog.text
    assert f"taking over the lock of pid {dead.pid} on host" in said and "(.submit.lock)" in said, said
    assert [r["job_id"] for r in json.loads((run_dir / "slurm_jobs.json").read_text())] == ["1250"]
    assert not (run_dir / ".submit.lock").exists()
