"""One run per folder: RUN/.lock refuses a second run before it writes, and is taken over when its holder is gone."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from celeba_dist.config import ConfigError, load_config
from celeba_dist.train.main import main
from celeba_dist.runlock import LOCK_NAME, Holder, RunLockedError, acquire, live_holder, pid_alive, read_holder
from shardkit import synthetic_shards
from test_resume import kill_mid_epoch
from test_train import accelerate_cmd, cpu_env

COMMON = ["data.batch_size=8", "data.num_workers=0", "data.image_size=[32, 32]", "log.progress_bar=false",
          "log.image_grid_size=0", "train.log_every_steps=5", "train.checkpoint_every_steps=4", "train.keep_last=3"]
HOST = platform.node()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("runlock"), num_images=200, samples_per_shard=16)


def train_cmd(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "celeba_dist.train", "--config", "smiling_simple_cnn", "--data", str(shards),
            "--run-dir", str(run_dir), "--set", *COMMON, *extra]


def write_lock(run_dir: Path, **fields) -> Holder:
    """A lock file as another process would have written it."""
    now = time.time()
    holder = Holder(**{"host": "node-elsewhere", "pid": 4242, "job_id": None, "restart": 0, "started": now - 3600,
                       "refreshed": now, "token": uuid.uuid4().hex, **fields})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(holder.__dict__))
    return holder


def files_of(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def wait_for_holder(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> Holder:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        holder = read_holder(run_dir / LOCK_NAME)
        if holder is not None and holder.pid == proc.pid:
            return holder
        time.sleep(0.05)
    raise AssertionError(f"the run (exit {proc.poll()}) did not lock {run_dir}")


# ---------------------------------------------------------------------------------------------
# Real trainings


def test_second_training_on_a_folder_in_use_stops_at_once_and_the_first_is_untouched(shards, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "first.log"
    with open(out, "w") as fh:
        first = subprocess.Popen([sys.executable, *train_cmd(shards, run_dir, "train.epochs=2")], env=cpu_env(),
                                 stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_for_holder(run_dir, first)
        os.kill(first.pid, signal.SIGSTOP)  # the first stays mid-run, unchanged, while the second one tries
        before = files_of(run_dir)
        started = time.monotonic()
        second = subprocess.run([sys.executable, *train_cmd(shards, run_dir, "train.epochs=2", "optim.lr=0.005")],
                                env=cpu_env(), capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
        assert files_of(run_dir) == before  # the second wrote nothing, not even a log file
    finally:
        os.kill(first.pid, signal.SIGCONT)
        first.wait(timeout=300)
    assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
    # ~8 s on a quiet 2-core machine, nearly all of it importing torch; the bound leaves room for a loaded one
    assert took < 60, f"the second run took {took:.0f} s to stop"
    assert f"is in use by another run: pid {first.pid} on host {HOST}" in second.stderr
    assert "started 20" in second.stderr and "last refreshed" in second.stderr
    assert first.returncode == 0, out.read_text()[-3000:]
    assert (run_dir / "metrics.json").is_file()
    assert "lr: 0.001" in (run_dir / "config.yaml").read_text()
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank0.log"]
    assert "in use by another run" not in (run_dir / "logs" / "rank0.log").read_text()
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert json.loads((run_dir / "rank_stats" / "rank0.json").read_text())["pid"] == first.pid
    assert "lost the lock" not in out.read_text()
    assert not (run_dir / LOCK_NAME).exists()  # released at the end
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(LOCK_NAME)] == []  # no temporary files left


def test_lock_of_a_killed_run_is_taken_over_and_the_run_resumes(shards, tmp_path):
    run_dir = tmp_path / "killed"
    args = train_cmd(shards, run_dir, "train.epochs=2")
    step = kill_mid_epoch([sys.executable, *args], run_dir, after_step=4)
    dead = read_holder(run_dir / LOCK_NAME)
    assert dead is not None and dead.host == HOST and not pid_alive(dead.pid)
    again = subprocess.run([sys.executable, *args], env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"taking over the lock of pid {dead.pid} on host {HOST}" in again.stdout
    assert f"process {dead.pid} no longer runs" in again.stdout
    assert f"step {step}" in again.stdout.split("resumed from", 1)[1].splitlines()[0]
    # the warning is in the run's log file too, although it was logged before the file could be opened
    assert f"taking over the lock of pid {dead.pid}" in (run_dir / "logs" / "rank0.log").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]
    assert not (run_dir / LOCK_NAME).exists()


def test_lock_of_another_host_refuses_while_fresh_and_is_taken_over_when_stale(shards, tmp_path):
    run_dir = tmp_path / "other"
    cfg = load_config("smiling_simple_cnn", [*COMMON, "train.epochs=1", "train.max_steps=2", "run.lock_stale_s=60"],
                      data_dir=str(shards), run_dir=str(run_dir))
    fresh = write_lock(run_dir, refreshed=time.time() - 45)
    with pytest.raises(RunLockedError, match=r"pid 4242 on host node-elsewhere, not a SLURM job, .*\(4\d s ago\)"):
        main(cfg)
    assert [p.name for p in run_dir.iterdir()] == [LOCK_NAME] and read_holder(run_dir / LOCK_NAME) == fresh
    write_lock(run_dir, refreshed=time.time() - 90)
    assert main(cfg)["status"] == "completed"
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "taking over the lock of pid 4242 on host node-elsewhere" in log and "not refreshed for 9" in log
    assert not (run_dir / LOCK_NAME).exists()


def test_eval_and_predict_read_a_locked_run(shards, tmp_path):
    from celeba_dist.evaluate import main as eval_main
    from celeba_dist.predict import main as predict_main

    run_dir = tmp_path / "done"
    cfg = load_config("smiling_simple_cnn", [*COMMON, "train.epochs=1", "train.max_steps=2", "train.eval_splits=[val]"],
                      data_dir=str(shards), run_dir=str(run_dir))
    main(cfg)
    lock = acquire(run_dir, stale_s=300)
    try:
        assert eval_main(["--run", str(run_dir), "--split", "test", "--out", str(tmp_path / "eval.json")]) == 0
        assert predict_main(["--checkpoint", str(run_dir / "checkpoints" / "best.pt"), "--input", str(shards),
                             "--split", "test", "--out", str(tmp_path / "pred.csv")]) == 0
        assert lock.is_ours()
    finally:
        lock.release()
    assert json.loads((tmp_path / "eval.json").read_text())["mean"]["num_samples"] > 0


def test_every_rank_of_a_ddp_run_on_a_locked_folder_stops_without_writing(shards, tmp_path):
    run_dir = tmp_path / "ddp"
    lock = acquire(run_dir, stale_s=300)  # held by this test process
    try:
        started = time.monotonic()
        proc = subprocess.run(accelerate_cmd(*train_cmd(shards, run_dir, "train.epochs=1")), env=cpu_env(),
                              capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
        assert [p.name for p in run_dir.iterdir()] == [LOCK_NAME]
    finally:
        lock.release()
    assert proc.returncode != 0
    assert took < 90, f"the ranks took {took:.0f} s to stop"  # ~14 s quiet: the launcher, two torch imports
    # each rank's own error, naming this process
    assert proc.stderr.count(f"celeba-dist train: error: run folder {run_dir} is in use by another run: "
                             f"pid {os.getpid()} on host {HOST}") == 2, proc.stderr[-3000:]


def test_submit_refuses_a_folder_in_use(tmp_path, capsys):
    from celeba_dist.launch.submit import main as submit_main

    run_dir = tmp_path / "queued"
    lock = acquire(run_dir, stale_s=300)
    try:
        # no shards: were the lock not checked (first), the data check would still keep a job from being queued
        code = submit_main(["--config", "smiling_simple_cnn", "--data", str(tmp_path / "no-shards"),
                            "--run-dir", str(run_dir), "--local"])
    finally:
        lock.release()
    assert code == 2
    assert f"in use by another run: pid {os.getpid()} on host {HOST}" in capsys.readouterr().err
    assert list(run_dir.iterdir()) == []  # nothing queued, nothing recorded


# ---------------------------------------------------------------------------------------------
# The module on its own


def test_acquire_refresh_and_release(tmp_path):
    run_dir = tmp_path / "r"
    lock = acquire(run_dir, stale_s=300, refresh_s=0.05)
    first = read_holder(run_dir / LOCK_NAME)
    assert (first.host, first.pid, first.token) == (HOST, os.getpid(), lock.holder.token) and lock.is_ours()
    deadline = time.monotonic() + 10
    while read_holder(run_dir / LOCK_NAME).refreshed == first.refreshed and time.monotonic() < deadline:
        time.sleep(0.02)
    later = read_holder(run_dir / LOCK_NAME)
    assert later.refreshed > first.refreshed and later.started == first.started and later.token == first.token
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host {HOST}"):  # alive: this very process
        acquire(run_dir, stale_s=300)
    assert live_holder(run_dir, stale_s=300).token == first.token
    lock.release()
    assert list(run_dir.iterdir()) == [] and not lock.lost.is_set()
    assert live_holder(run_dir, stale_s=300) is None


def test_a_live_run_keeps_its_lock_fresh_well_within_lock_stale_s(tmp_path):
    """The refresh interval follows run.lock_stale_s (a quarter of it, 30 s at most): however small lock_stale_s
    is, a live run's lock never looks stale, so no second run takes its folder over."""
    lock = acquire(tmp_path, stale_s=1.0)
    try:
        time.sleep(2.5)  # lock_stale_s, two and a half times over
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host {HOST}"):
            acquire(tmp_path, stale_s=1.0).release()
        assert lock.is_ours() and not lock.lost.is_set()
        assert time.time() - read_holder(tmp_path / LOCK_NAME).refreshed < 1.0
    finally:
        lock.release()
    assert list(tmp_path.iterdir()) == []


def test_a_lock_taken_away_is_reported_lost_and_left_to_its_new_holder(tmp_path):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("celeba_dist.runlock")
    logger.addHandler(handler)
    try:
        lock = acquire(tmp_path, stale_s=300, refresh_s=0.05)
        other = write_lock(tmp_path)
        assert lock.lost.wait(10)
        lock.release()
    finally:
        logger.removeHandler(handler)
    assert read_holder(tmp_path / LOCK_NAME) == other
    assert any(r.levelno == logging.ERROR and "taken over by pid 4242 on host node-elsewhere" in r.getMessage()
               for r in records)


def test_unreadable_lock_file_counts_as_a_holder_until_stale(tmp_path):
    (tmp_path / LOCK_NAME).write_text("not json")
    with pytest.raises(RunLockedError, match="unreadable lock file"):
        acquire(tmp_path, stale_s=300)
    os.utime(tmp_path / LOCK_NAME, (time.time() - 400, time.time() - 400))
    acquire(tmp_path, stale_s=300).release()
    assert list(tmp_path.iterdir()) == []


def test_a_requeued_slurm_job_takes_over_its_earlier_start(tmp_path):
    previous = write_lock(tmp_path, job_id="4711", restart=0)  # fresh, on another node
    for job, restart in (("4711", "0"), ("4712", "1")):  # the same start again; another job
        with pytest.raises(RunLockedError, match=r"SLURM job 4711 \(restart 0\)"):
            acquire(tmp_path, stale_s=300, environ={"SLURM_JOB_ID": job, "SLURM_RESTART_COUNT": restart})
    assert read_holder(tmp_path / LOCK_NAME) == previous
    old = acquire(tmp_path, stale_s=300, refresh_s=0.05, environ={"SLURM_JOB_ID": "4711", "SLURM_RESTART_COUNT": "1"})
    assert read_holder(tmp_path / LOCK_NAME).job_id == "4711" and read_holder(tmp_path / LOCK_NAME).restart == 1
    new = acquire(tmp_path, stale_s=300, environ={"SLURM_JOB_ID": "4711", "SLURM_RESTART_COUNT": "2"})
    assert old.lost.wait(10)  # the lingering incarnation notices at its next refresh
    old.release()
    assert read_holder(tmp_path / LOCK_NAME).token == new.holder.token
    new.release()
    assert list(tmp_path.iterdir()) == []


def test_a_taker_with_an_outdated_judgment_leaves_the_newer_lock(tmp_path):
    from celeba_dist.runlock import _move_aside

    judged = write_lock(tmp_path, refreshed=time.time() - 1000)  # what a slow taker read and judged stale
    newer = write_lock(tmp_path)  # meanwhile another taker's lock (or the holder's refresh) replaced it
    assert not _move_aside(tmp_path / LOCK_NAME, judged)
    assert read_holder(tmp_path / LOCK_NAME) == newer and [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]
    assert _move_aside(tmp_path / LOCK_NAME, newer) and list(tmp_path.iterdir()) == []


def _take_over(run_dir: Path, barrier, results, done, delay: float) -> None:
    barrier.wait()
    time.sleep(delay)  # spread the takers over the window in which the first one replaces the stale lock
    try:
        lock = acquire(run_dir, stale_s=300)
    except RunLockedError:
        results.put(("refused", os.getpid()))
        return
    results.put(("won", os.getpid()))
    done.wait(30)  # hold the lock until every taker has decided
    lock.release()


def test_of_concurrent_takers_of_a_stale_lock_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    takers = 4
    for round_ in range(6):
        run_dir = tmp_path / f"round{round_}"
        write_lock(run_dir, refreshed=time.time() - 1000)
        barrier, results, done = ctx.Barrier(takers), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_take_over, args=(run_dir, barrier, results, done, 0.002 * i * round_))
                 for i in range(takers)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in range(takers)]
        winners = [pid for what, pid in outcomes if what == "won"]
        assert len(winners) == 1, f"round {round_}: {outcomes}"
        assert read_holder(run_dir / LOCK_NAME).pid == winners[0]
        done.set()
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0] * takers
        assert list(run_dir.iterdir()) == []


def test_a_new_folder_removed_by_a_refused_submit_before_the_lock_is_written_is_made_again(tmp_path, monkeypatch):
    """Two submits make one new folder: the second, refused (no shards there), removes it while still empty as
    the first writes its lock into it. The first makes it again and locks it (it used to stop with [Errno 2])."""
    from celeba_dist import runlock

    run_dir = tmp_path / "new" / "run"
    real_write, removals = runlock._write_temp, []

    def write_after_the_refused_submit_cleaned_up(path, holder):
        if not removals:  # once: the other submit's remove_empty(), between this mkdir and this write
            run_dir.rmdir()
            run_dir.parent.rmdir()  # it made both
            removals.append(path)
        return real_write(path, holder)

    monkeypatch.setattr(runlock, "_write_temp", write_after_the_refused_submit_cleaned_up)
    lock = acquire(run_dir, stale_s=300, user=runlock.SUBMIT)
    assert removals == [run_dir / ".submit.lock"]
    assert read_holder(run_dir / ".submit.lock").pid == os.getpid()
    assert [p.name for p in run_dir.iterdir()] == [".submit.lock"]  # no temporary file left beside it
    lock.release()
    assert list(run_dir.iterdir()) == []


def test_lock_stale_s_is_validated():
    with pytest.raises(ConfigError, match=r"run.lock_stale_s must be >= 10"):
        load_config("default", ["run.lock_stale_s=5"])


def test_a_run_whose_lock_is_taken_over_stops_at_its_next_step_check(shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, *train_cmd(shards, run_dir, "run.lock_stale_s=10", "train.sync_every_steps=1",
                                      "train.checkpoint_every_steps=2", "train.epochs=20")]
    proc = subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_holder(run_dir, proc)
    while not list((run_dir / "checkpoints").glob("step-*.pt")) and proc.poll() is None:
        time.sleep(0.1)
    other = write_lock(run_dir)  # another process took the folder over (e.g. after a long network partition)
    taken = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    assert time.monotonic() - taken < 30, "the run noticed at its next lock refresh and stopped at the next step"
    assert f"another process took the lock of {run_dir} over" in err
    assert read_holder(run_dir / LOCK_NAME) == other  # left to its new holder
    assert not (run_dir / "metrics.json").exists()


@pytest.mark.slurm
def test_the_lock_of_an_ended_slurm_job_on_another_node_is_taken_over_at_once(slurm_cluster, tmp_path, caplog):
    """A job SIGKILLed on another node (a node failure, an OOM kill, ``scancel -s KILL``) leaves a fresh
    lock that no pid check here can judge; once the scheduler says that job has ended, a new run (here, or
    a job of its own) takes the folder over at once instead of after ``run.lock_stale_s``."""
    from celeba_dist.scheduler import ACTIVE_STATES, scheduler_states, wait_until_ended

    job = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--wrap", "sleep 120"], capture_output=True,
                         text=True, timeout=60, check=True).stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 60
        while scheduler_states([job]).get(job) not in ACTIVE_STATES:
            assert time.monotonic() < deadline, f"job {job} never showed up"
            time.sleep(0.5)
        held = write_lock(tmp_path, job_id=job)  # refreshed now, on a host that is not this one
        for environ in ({}, {"SLURM_JOB_ID": str(int(job) + 1000), "SLURM_RESTART_COUNT": "0"}):
            with pytest.raises(RunLockedError, match=f"SLURM job {job} "):
                acquire(tmp_path, stale_s=300, environ=environ)
        assert read_holder(tmp_path / LOCK_NAME) == held
    finally:
        subprocess.run(["scancel", "--signal=KILL", "--full", job], capture_output=True, timeout=30)
    assert wait_until_ended([job], timeout_s=60).get(job) not in ACTIVE_STATES
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="celeba_dist.runlock"):
        lock = acquire(tmp_path, stale_s=300, environ={})
    assert time.monotonic() - started < 30
    assert f"because its SLURM job {job} has ended (CANCELLED)" in caplog.text
    assert lock.holder.job_id is None and read_holder(tmp_path / LOCK_NAME).token == lock.holder.token
    lock.release()
    assert list(tmp_path.iterdir()) == []
