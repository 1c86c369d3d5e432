"""The launch layer's refusals that need no cluster: bad resource values, a run folder that cannot be
made, damaged ``slurm_jobs.json`` files; each a one-line error with exit 2 before anything is queued."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import submitit

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
    from celeba_dist.launch.status import scheduler_states

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
