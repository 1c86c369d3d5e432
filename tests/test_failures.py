"""Runs that go wrong end promptly, say what went wrong, keep what was trained, and resume.

Each fault is checked the same way: the exit code, how long the run took to end, what is left in
the run folder, and that the same command, run again once the fault is gone, finishes the run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from celeba_dist.train.checkpoint import list_checkpoints
from celeba_dist.runlock import LOCK_NAME
from shardkit import synthetic_shards
from test_train import accelerate_cmd, cpu_env

# Loader workers on (the default is 2): the hang this file guards against needs them.
FAST = ["data.batch_size=16", "data.num_workers=2", "data.image_size=[32, 32]", "log.progress_bar=false",
        "log.image_grid_size=0", "train.log_every_steps=2", "train.sync_every_steps=2",
        "train.checkpoint_every_steps=4", "train.keep_last=100", "train.epochs=1", "train.eval_splits=[val]"]
ENDS_WITHIN_S = 60
MISSING = "train/celeba-train-000003.tar"


def train_cmd(shards: Path, run_dir: Path, *extra: str, processes: int = 1) -> list[str]:
    args = ["-m", "celeba_dist.train", "--config", "smiling_simple_cnn", "--data", str(shards),
            "--run-dir", str(run_dir), "--set", *FAST, *extra]
    return accelerate_cmd(*args, processes=processes) if processes > 1 else [sys.executable, *args]


def run(cmd: list[str], timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


def total_steps(shards: Path, *, world: int = 1, epochs: int = 1) -> int:
    train = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["num_samples"]
    return train // (16 * world) * epochs


def finished_step(run_dir: Path) -> int:
    assert (run_dir / "metrics.json").is_file()
    return json.loads((run_dir / "rank_stats" / "rank0.json").read_text())["global_step"]


def assert_no_leftover_processes(run_dir: Path) -> None:
    """No process of the run (ranks or their loader workers) outlives it."""
    leftovers = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(run_dir) in cmdline:
                leftovers.append(f"{proc.name}: {cmdline}")
    assert not leftovers, leftovers


def fault_after_first_checkpoint(cmd: list[str], run_dir: Path, fault: Callable[[subprocess.Popen], None]
                                 ) -> tuple[int, str, float]:
    """Start ``cmd``, apply ``fault`` to it once its first checkpoint is on disk, and wait for the end:
    (exit code, output, seconds from the fault to the end)."""
    launcher = subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list_checkpoints(run_dir / "checkpoints"):
            assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint before the fault"
            time.sleep(0.05)
        fault(launcher)
        faulted = time.monotonic()
        out, _ = launcher.communicate(timeout=120)
        return launcher.returncode, out, time.monotonic() - faulted
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


def cut_member_header(shard: Path, member_index: int) -> str | None:
    """Make one member's tar header claim more bytes than the file holds.

    The file keeps its size (the start-up size check passes); its sha256 changes. Returns the
    key of the sample before the damaged member (None for the first).
    """
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    with open(shard, "r+b") as fh:
        fh.seek(members[member_index].offset + 124)
        fh.write(b"77777777777\0")  # the size field: 8 GiB
    return members[member_index - 1].name.split(".")[0] if member_index else None


# ---------------------------------------------------------------------------------------------
# A shard the manifest lists is missing


@pytest.mark.parametrize("processes", [1, 2])
def test_missing_shard_is_caught_before_the_model_is_built(shards, tmp_path, processes):
    (shards / MISSING).rename(tmp_path / "aside.tar")
    run_dir = tmp_path / "run"
    cmd = train_cmd(shards, run_dir, processes=processes)
    proc, seconds = run(cmd)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert seconds < ENDS_WITHIN_S, seconds
    assert f"{MISSING}: missing" in out and f"celeba-dist verify {shards}" in out
    assert "built simple_cnn" not in out  # before the model, let alone a step
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()
    assert_no_leftover_processes(run_dir)
    (tmp_path / "aside.tar").rename(shards / MISSING)
    proc, _ = run(cmd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert finished_step(run_dir) == total_steps(shards, world=processes)
    if processes == 1:  # `eval` reads through the same loader: a worker's error ends it as well
        val_shard = shards / "val" / "celeba-val-000001.tar"
        val_shard.unlink()
        proc, seconds = run([sys.executable, "-m", "celeba_dist.evaluate", "--run", str(run_dir), "--split", "val",
                             "--set", "data.check_shards=none", "data.num_workers=2"])
        assert proc.returncode == 1 and seconds < ENDS_WITHIN_S, (proc.stdout + proc.stderr)[-3000:]
        assert f"cannot read shard {val_shard}" in proc.stderr


@pytest.mark.parametrize("processes", [1, 2])
def test_missing_shard_without_the_check_still_ends_the_run(shards, tmp_path, processes):
    """The loader workers' error reaches the training process, which ends, workers and peers included.

    Two shards go missing: an epoch leaves out fewer than batch x world samples (17 here), which can
    hold one whole shard of 16, never two, so the epoch certainly opens one of them."""
    missing = [MISSING, "train/celeba-train-000009.tar"]
    for i, name in enumerate(missing):
        (shards / name).rename(tmp_path / f"aside-{i}.tar")
    run_dir = tmp_path / "run"
    cmd = train_cmd(shards, run_dir, "data.check_shards=none", processes=processes)
    proc, seconds = run(cmd)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert seconds < ENDS_WITHIN_S, seconds
    assert any(f"cannot read shard {shards / name}" in out for name in missing) and "No such file" in out
    assert not (run_dir / "metrics.json").exists()
    assert_no_leftover_processes(run_dir)
    for i, name in enumerate(missing):
        (tmp_path / f"aside-{i}.tar").rename(shards / name)
    proc, _ = run(cmd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert finished_step(run_dir) == total_steps(shards, world=processes)


# ---------------------------------------------------------------------------------------------
# A shard damaged inside, at its manifest size


def test_damaged_shard_ends_the_run_naming_shard_and_sample_then_resumes(shards, tmp_path, pristine):
    shard = shards / "train" / "celeba-train-000005.tar"
    previous = cut_member_header(shard, member_index=5 * 8)  # the 9th sample's first member (5 per sample)
    run_dir = tmp_path / "run"
    cmd = train_cmd(shards, run_dir, "data.check_shards=size")
    proc, seconds = run(cmd)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert seconds < ENDS_WITHIN_S, seconds
    assert f"cannot read shard {shard}" in out and "truncated tar member" in out
    assert f"(after sample {previous})" in out
    assert not (run_dir / "metrics.json").exists()
    for ckpt in list_checkpoints(run_dir / "checkpoints"):  # what was saved before the error is intact
        torch.load(ckpt, map_location="cpu", weights_only=False)
    assert_no_leftover_processes(run_dir)
    shutil.copyfile(pristine / shard.relative_to(shards), shard)
    proc, _ = run(cmd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert finished_step(run_dir) == total_steps(shards)


def test_shard_cut_short_in_place_during_the_run_ends_it_naming_the_shard_then_resumes(shards, tmp_path, pristine):
    """The run indexes its shards once; a shard truncated in place afterwards (not replaced by rename, as
    ``pack`` writes) is an error naming it at the next read, not a loader worker killed by SIGBUS."""
    shard = shards / "train" / "celeba-train-000004.tar"
    run_dir = tmp_path / "run"
    cmd = train_cmd(shards, run_dir, "train.epochs=3")
    def cut(_: subprocess.Popen) -> None:  # after the first checkpoint: in epoch 0, after the index was made
        os.truncate(shard, shard.stat().st_size // 2)

    code, out, seconds = fault_after_first_checkpoint(cmd, run_dir, cut)
    assert code == 1, out[-3000:]
    assert seconds < ENDS_WITHIN_S, seconds
    assert f"cannot read shard {shard}: {shard}: " in out, out[-3000:]
    assert "changed on disk since the run indexed it" in out or "cut short while the run read it" in out
    assert "killed by signal" not in out and "Bus error" not in out
    assert not (run_dir / "metrics.json").exists()
    for ckpt in list_checkpoints(run_dir / "checkpoints"):
        torch.load(ckpt, map_location="cpu", weights_only=False)
    assert_no_leftover_processes(run_dir)
    newest = list_checkpoints(run_dir / "checkpoints")[0]
    shutil.copyfile(pristine / shard.relative_to(shards), shard)
    proc, _ = run(cmd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"resumed from {newest}" in proc.stdout + proc.stderr
    assert finished_step(run_dir) == total_steps(shards, epochs=3)


def test_verify_shards_catches_the_damage_before_training(shards, tmp_path):
    cut_member_header(shards / "val" / "celeba-val-000001.tar", member_index=0)
    run_dir = tmp_path / "run"
    proc, seconds = run([*train_cmd(shards, run_dir, processes=2), "--verify-shards"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert seconds < ENDS_WITHIN_S, seconds
    assert "val/celeba-val-000001.tar: sha256 differs from the manifest" in out
    assert "built simple_cnn" not in out and not (run_dir / "checkpoints").exists()


def test_an_empty_eval_split_is_refused_before_training_then_the_run_without_it_finishes(tmp_path):
    """Shards packed with no val sample (``--resplit 0.9,0,0.1``): the run stops before building anything,
    naming the split and the override, instead of failing after its first epoch."""
    shards = synthetic_shards(tmp_path, num_images=120, samples_per_shard=16, extra=("--resplit", "0.9,0,0.1"))
    run_dir = tmp_path / "run"
    proc, seconds = run(train_cmd(shards, run_dir, "train.eval_splits=[val, test]"))
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    assert seconds < ENDS_WITHIN_S, seconds
    assert proc.stderr.strip().splitlines()[-1] == (
        f"celeba-dist train: error: train.eval_splits: the shards in {shards} hold no val samples (their manifest "
        "lists 0): leave val out, --set train.eval_splits=[test]; without val, each epoch's weights replace the "
        "last as the run's best")
    assert not run_dir.exists()
    proc, _ = run(train_cmd(shards, run_dir, "train.eval_splits=[test]", "train.epochs=2"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["mean"]["num_samples"] > 0
    # as the error said: without val, each epoch's weights replace the last as the run's best (and best.pt follows)
    assert (metrics["best_epoch"], metrics["best_step"]) == (1, total_steps(shards, epochs=2))
    best = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert best["state"]["global_step"] == metrics["best_step"]
    # `eval` of the empty split: refused the same way, not a table of zeros
    proc, _ = run([sys.executable, "-m", "celeba_dist", "eval", "--run", str(run_dir), "--split", "val"])
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"celeba-dist eval: error: --split val: the shards in {shards} hold no val samples (their manifest lists 0); "
        "evaluate another split")
    assert not (run_dir / "eval_val.json").exists()


# ---------------------------------------------------------------------------------------------
# Group signals and loader workers

STORM = """
import os, signal, sys, threading, time
import torch
from torch.utils.data import IterableDataset
from celeba_dist.data.streams import make_loader

class One(IterableDataset):
    def __iter__(self):
        yield torch.zeros(1)

received = []
signal.signal(signal.SIGTERM, lambda sig, frame: received.append(sig))  # the training process's stop flag
def storm():
    while True:
        os.killpg(0, signal.SIGTERM)  # to every process of the group, as SLURM and torchrun do
        time.sleep(0.002)
threading.Thread(target=storm, daemon=True).start()
loaders, deadline = 0, time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    assert [b.item() for b in make_loader(One(), num_workers=2)] == [0.0, 0.0]
    loaders += 1
print(f"{loaders} loaders, {len(received)} SIGTERMs")
"""


def test_a_sigterm_storm_never_kills_a_starting_loader_worker():
    """PyTorch's workers die of a SIGTERM that reaches them before ``worker_init_fn`` ignores it.

    Without the signals blocked across the fork this fails within a second or two here
    ("DataLoader worker ... exited unexpectedly").
    """
    proc = subprocess.run([sys.executable, "-c", STORM, "4"], env=cpu_env(), capture_output=True, text=True,
                          timeout=120, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaders, signals_received = proc.stdout.split()[0::2]
    assert int(loaders) >= 5 and int(signals_received) >= 100, proc.stdout


# ---------------------------------------------------------------------------------------------
# One rank of a DDP run dies


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the training process with RANK=rank among the launcher's children."""
    for task in Path(f"/proc/{launcher.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
    return None


def signal_rank(rank: int, sig: signal.Signals) -> Callable[[subprocess.Popen], None]:
    """A fault for :func:`fault_after_first_checkpoint`: ``sig`` to the training process of ``rank``."""
    def fault(launcher: subprocess.Popen) -> None:
        victim = _rank_pid(launcher, rank)
        assert victim is not None
        os.kill(victim, sig)
    return fault


def test_sigkill_of_one_rank_ends_the_other_and_the_run_resumes(pristine, tmp_path):
    run_dir = tmp_path / "run"
    cmd = train_cmd(pristine, run_dir, "train.epochs=2", processes=2)
    code, out, seconds = fault_after_first_checkpoint(cmd, run_dir, signal_rank(1, signal.SIGKILL))
    assert code != 0, out[-3000:]
    assert seconds < ENDS_WITHIN_S, seconds
    assert not (run_dir / "metrics.json").exists()
    assert_no_leftover_processes(run_dir)
    newest = list_checkpoints(run_dir / "checkpoints")[0]
    saved = torch.load(newest, map_location="cpu", weights_only=False)["state"]["global_step"]
    assert 0 < saved < total_steps(pristine, world=2, epochs=2)
    proc, _ = run(cmd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"resumed from {newest}" in proc.stdout + proc.stderr
    assert finished_step(run_dir) == total_steps(pristine, world=2, epochs=2)


def test_a_stop_signal_to_one_rank_stops_both_at_the_same_step(pristine, tmp_path):
    """SIGTERM to rank 1 alone (a node agent or an OOM guard signalling one process, not the whole job): the
    ranks agree on the stop at the next sync and checkpoint together at one step, rank 0 saying another rank
    asked; a rank stopping on its own would leave its peer in another collective until the timeout."""
    run_dir = tmp_path / "run"
    cmd = train_cmd(pristine, run_dir, "train.epochs=3", "train.collective_timeout_min=0.25", processes=2)
    code, out, seconds = fault_after_first_checkpoint(cmd, run_dir, signal_rank(1, signal.SIGTERM))
    logs = [(run_dir / "logs" / f"rank{r}.log").read_text() for r in (0, 1)]
    stops = [re.findall(r"stop requested by (SIGTERM|another rank) \(terminate\): checkpointing at step (\d+)", log)
             for log in logs]
    assert [[by for by, _ in found] for found in stops] == [["another rank"], ["SIGTERM"]], (stops, out[-3000:])
    step = int(stops[0][0][1])
    assert stops[1][0][1] == str(step) and step % 2 == 0  # train.sync_every_steps=2
    assert code != 0 and seconds < 30, (code, seconds, out[-3000:])
    saved = torch.load(list_checkpoints(run_dir / "checkpoints")[0], map_location="cpu", weights_only=False)
    assert saved["state"]["global_step"] == step < total_steps(pristine, world=2, epochs=3)
    assert not (run_dir / "metrics.json").exists()
    assert_no_leftover_processes(run_dir)


def test_a_hung_rank_ends_the_run_after_collective_timeout_min_naming_it_then_resumes(pristine, tmp_path):
    """A rank that stops answering (SIGSTOP: a stuck filesystem, a deadlock) holds its peer in a collective:
    after ``train.collective_timeout_min`` the peer fails with an error naming that key, the launcher ends
    the stuck rank, and the same command resumes from the last checkpoint."""
    run_dir, timeout_s = tmp_path / "run", 15
    cmd = train_cmd(pristine, run_dir, "train.epochs=2", f"train.collective_timeout_min={timeout_s / 60}", processes=2)
    code, out, seconds = fault_after_first_checkpoint(cmd, run_dir, signal_rank(1, signal.SIGSTOP))
    assert code != 0, out[-3000:]
    assert "train.collective_timeout_min" in out, out[-3000:]
    # the timeout, then the launcher's 30 s between its SIGTERM and SIGKILL to the stuck rank
    assert timeout_s - 1 < seconds < timeout_s + 30 + 25, seconds
    assert not (run_dir / "metrics.json").exists()
    assert not (run_dir / LOCK_NAME).exists()  # released by the rank that failed
    assert_no_leftover_processes(run_dir)
    newest = list_checkpoints(run_dir / "checkpoints")[0]
    proc, _ = run(cmd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"resumed from {newest}" in proc.stdout + proc.stderr
    assert finished_step(run_dir) == total_steps(pristine, world=2, epochs=2)


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def kill_a_worker(launcher: subprocess.Popen) -> None:
    """SIGKILL to one loader worker of a 1-process run, as the kernel's out-of-memory killer sends it."""
    workers = _children(launcher.pid)
    assert workers, "no loader worker runs"
    os.kill(workers[0], signal.SIGKILL)


def hang_the_next_reads(shards: Path) -> Callable[[subprocess.Popen], None]:
    """Every training shard becomes a FIFO nobody writes: a worker that opens its next shard waits for ever,
    as on a hung network filesystem. The shards themselves wait beside, as ``*.aside``."""
    def fault(_: subprocess.Popen) -> None:
        for shard in sorted((shards / "train").glob("*.tar")):
            shard.rename(shard.with_suffix(".aside"))
            os.mkfifo(shard)
    return fault


@pytest.mark.parametrize("fault, error", [
    ("killed", ["DataLoader worker (pid", "out-of-memory killer", "data.num_workers"]),
    ("hung", ["DataLoader timed out after 5.0 seconds (data.loader_timeout_s): a loader worker delivered"]),
], ids=["killed (the OOM killer)", "hung (a read that never returns)"])
def test_a_loader_worker_killed_or_hung_mid_epoch_ends_the_run_naming_it_then_resumes(shards, tmp_path, fault, error):
    """The kernel's OOM killer (here a SIGKILL) takes one loader worker, or the workers' reads hang (a stuck
    filesystem): the run ends with an error that says which and what to change, at once or after
    ``data.loader_timeout_s``, keeps its checkpoints, and the same command resumes."""
    run_dir = tmp_path / "run"
    cmd = train_cmd(shards, run_dir, "train.epochs=2", "data.loader_timeout_s=5")
    inflict = kill_a_worker if fault == "killed" else hang_the_next_reads(shards)
    code, out, seconds = fault_after_first_checkpoint(cmd, run_dir, inflict)
    for fifo in (shards / "train").glob("*.aside"):
        fifo.with_suffix(".tar").unlink()
        fifo.rename(fifo.with_suffix(".tar"))
    assert code == 1, out[-3000:]
    assert seconds < ENDS_WITHIN_S, seconds
    last = out.strip().splitlines()[-1]
    assert last.startswith("celeba-dist train: error: ") and all(e in last for e in error), last
    assert "Traceback" not in out
    assert not (run_dir / "metrics.json").exists() and not (run_dir / LOCK_NAME).exists()
    assert_no_leftover_processes(run_dir)
    newest = list_checkpoints(run_dir / "checkpoints")[0]
    proc, _ = run(cmd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"resumed from {newest}" in proc.stdout + proc.stderr
    assert finished_step(run_dir) == total_steps(shards, epochs=2)
