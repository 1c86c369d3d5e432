"""Checkpoints survive SIGKILL: a killed run restarted with the same command ends where an uninterrupted one does."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from celeba_dist import signals
from celeba_dist.train.checkpoint import list_checkpoints, load_newest_valid
from celeba_dist.train.resume import resume_hint
from shardkit import synthetic_shards
from test_train import accelerate_cmd, cpu_env

COMMON = ["data.batch_size=8", "data.num_workers=1", "data.image_size=[32, 32]", "log.progress_bar=false",
          "log.image_grid_size=0", "train.log_every_steps=5", "train.checkpoint_every_steps=7", "train.keep_last=3",
          "train.epochs=3"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("resume"), num_images=600, samples_per_shard=24)


def train_cmd(shards: Path, run_dir: Path, *extra: str, processes: int = 1) -> list[str]:
    args = ["-m", "celeba_dist.train", "--config", "smiling_simple_cnn", "--data", str(shards),
            "--run-dir", str(run_dir), "--set", *COMMON, *extra]
    return accelerate_cmd(*args, processes=processes) if processes > 1 else [sys.executable, *args]


def run_to_end(cmd: list[str], env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, env=env or cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def newest_step(run_dir: Path) -> int:
    ckpts = list_checkpoints(run_dir / "checkpoints")
    return int(ckpts[0].stem.split("-")[1]) if ckpts else -1


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it, as a crashed node would lose them.

    Not ``os.killpg``: torch's elastic agent (under ``accelerate launch``) starts each rank in a session
    of its own, so the launcher's process group holds neither the ranks nor their loader workers.
    Everything is stopped first, so that no process sees a peer die and reacts before its own end.
    """
    root = psutil.Process(pid)
    procs: dict[int, psutil.Process] = {}
    while new := [p for p in [root, *root.children(recursive=True)] if p.pid not in procs]:
        for p in new:  # a rank may fork a loader worker meanwhile: list again until nothing new appears
            procs[p.pid] = p
            with contextlib.suppress(psutil.NoSuchProcess):
                p.suspend()
    for p in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    deadline = time.time() + 30
    while alive := [p for p in procs.values() if _alive(p)]:
        assert time.time() < deadline, f"still running after SIGKILL: {alive}"
        time.sleep(0.05)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_when(cmd: list[str], run_dir: Path, ready: Callable[[], bool]) -> int:
    """Start ``cmd``, SIGKILL it with all its processes once ``ready()``; returns the newest checkpoint's step."""
    proc = subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run_dir / "metrics.json").exists()
    return newest_step(run_dir)


def kill_mid_epoch(cmd: list[str], run_dir: Path, *, after_step: int) -> int:
    """Start ``cmd``, SIGKILL its whole process group once a checkpoint past ``after_step`` exists."""
    return kill_when(cmd, run_dir, lambda: newest_step(run_dir) >= after_step)


def event_steps(run_dir: Path) -> dict[str, list[int]]:
    """Each scalar tag's steps as TensorBoard's own reader shows them (purging included)."""
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def final_state(run_dir: Path) -> tuple[dict, dict]:
    ckpt = final_checkpoint(run_dir)
    return ckpt["state"], ckpt["model"]


def final_checkpoint(run_dir: Path) -> dict:
    return load_newest_valid(run_dir / "checkpoints")[1]


def steps_per_epoch(shards: Path, world: int) -> int:
    return json.loads((shards / "manifest.json").read_text())["splits"]["train"]["num_samples"] // (8 * world)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_killed_two_process_run_resumes_without_losing_or_repeating_steps(shards, tmp_path):
    extra = ("train.deterministic=true", "train.epochs=2")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(train_cmd(shards, straight, *extra, processes=2))
    cmd = train_cmd(shards, killed, *extra, processes=2)
    step = kill_mid_epoch(cmd, killed, after_step=7)
    spe = steps_per_epoch(shards, 2)
    assert step % spe != 0 or step == 0, "the kill should land mid-epoch"
    run_to_end(cmd)
    state, _ = final_state(killed)
    assert state["global_step"] == 2 * spe
    assert [h["epoch"] for h in state["history"]] == [0, 1]  # no epoch counted twice
    metrics = json.loads((killed / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]
    # both ranks trained exactly their share of the whole run, across the kill
    stats = [json.loads((killed / "rank_stats" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["samples_seen"] for s in stats] == [2 * spe * 8] * 2
    # Each rank got its own RNG state back: dropout masks differ per rank, so a missing or swapped rank-1 state
    # would change the averaged gradients and the weights would no longer be those of the uninterrupted run.
    assert_same_weights(final_state(straight)[1], final_state(killed)[1])


def assert_killed_run_resumes_exactly(shards: Path, tmp_path: Path, *extra: str) -> None:
    """One process, deterministic: SIGKILL mid-epoch, restart with the same command, and the run ends with the
    uninterrupted run's step count and bit-identical weights."""
    extra = ("train.deterministic=true", *extra)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(train_cmd(shards, straight, *extra))
    cmd = train_cmd(shards, killed, *extra)
    step = kill_mid_epoch(cmd, killed, after_step=14)
    assert step % steps_per_epoch(shards, 1) != 0, "the kill should land mid-epoch"
    run_to_end(cmd)
    c1, c2 = final_checkpoint(straight), final_checkpoint(killed)
    assert c1["state"]["global_step"] == c2["state"]["global_step"] == 3 * steps_per_epoch(shards, 1)
    assert_same_weights(c1["model"], c2["model"])
    if c1["ema"] is not None:  # train.ema_decay: the average continued across the kill, to the bit
        assert c1["ema_updates"] == c2["ema_updates"] == c1["state"]["global_step"]
        assert_same_weights(c1["ema"], c2["ema"])
        assert not all(torch.equal(c1["ema"][k], c1["model"][k]) for k in c1["model"])


def test_deterministic_resume_gives_bit_identical_weights_and_ema(shards, tmp_path):
    assert_killed_run_resumes_exactly(shards, tmp_path, "train.ema_decay=0.9")


def test_resume_purges_events_logged_after_the_checkpoint(shards, tmp_path):
    """Killed with train/loss events on disk past its last checkpoint, the resumed run logs those steps again;
    TensorBoard must show every step once (the resume purges the stale events) and the curve must continue."""
    run_dir = tmp_path / "purge"
    cmd = train_cmd(shards, run_dir, "train.epochs=1", "train.log_every_steps=1", "train.checkpoint_every_steps=20")

    def events_past_checkpoint() -> bool:
        step = newest_step(run_dir)
        return step > 0 and max(event_steps(run_dir).get("train/loss", [0])) >= step + 3

    checkpoint = kill_when(cmd, run_dir, events_past_checkpoint)
    logged = event_steps(run_dir)["train/loss"]
    assert checkpoint in (20, 40) and max(logged) > checkpoint, (checkpoint, logged)  # stale events to purge
    run_to_end(cmd)
    steps = event_steps(run_dir)
    assert steps["train/loss"] == list(range(1, steps_per_epoch(shards, 1) + 1))  # every step once: continued, not restarted or doubled
    for tag, seen in steps.items():
        assert seen == sorted(set(seen)), (tag, seen)  # strictly increasing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs CUDA: build_accelerator refuses fp16 on the "
                    "CPU, so no grad scaler exists here; tools/gpu_check.sh (part 'tests') runs this on a GPU")
def test_fp16_grad_scaler_state_survives_a_resume(shards, tmp_path):
    """The scaler's scale and growth tracker are checkpointed and restored: a run stopped at step 20 and resumed
    ends with the scaler state of an uninterrupted run (a fresh scaler would restart its growth tracker)."""
    gpu = {k: v for k, v in cpu_env().items() if k != "CUDA_VISIBLE_DEVICES"}
    # not train.deterministic: AdaptiveAvgPool2d has no deterministic CUDA backward, and the scaler state
    # depends only on which steps overflowed, not on the last bits of the weights
    extra = ("train.precision=fp16", "train.epochs=1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_to_end(train_cmd(shards, straight, *extra), gpu)
    run_to_end(train_cmd(shards, resumed, *extra, "train.max_steps=20"), gpu)
    stopped = load_newest_valid(resumed / "checkpoints")[1]
    assert stopped["state"]["global_step"] == 20 and stopped["scaler"]["scale"] > 0
    run_to_end(train_cmd(shards, resumed, *extra), gpu)
    (_, a), (_, b) = load_newest_valid(straight / "checkpoints"), load_newest_valid(resumed / "checkpoints")
    assert a["state"]["global_step"] == b["state"]["global_step"] == steps_per_epoch(shards, 1)
    assert a["scaler"] == b["scaler"]


def test_corrupt_newest_checkpoint_falls_back_to_previous(shards, tmp_path):
    run_dir = tmp_path / "corrupt"
    cmd = train_cmd(shards, run_dir, "train.epochs=1")
    run_to_end(cmd)
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert len(ckpts) >= 2
    newest = ckpts[0]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    path, ckpt = load_newest_valid(run_dir / "checkpoints")
    assert path == ckpts[1]
    # submit's login-node check maps the tensors instead of reading them: it skips the broken file just the same
    mapped_path, mapped = load_newest_valid(run_dir / "checkpoints", mmap=True)
    assert mapped_path == ckpts[1] and mapped["config"] == ckpt["config"]
    # what a failed run tells the user to resume from (a full disk, Ctrl-C pressed twice) skips it too
    assert resume_hint(run_dir / "checkpoints").startswith(f"the newest intact checkpoint is {ckpts[1]}: ")
    previous = ckpt["state"]["global_step"]
    proc = subprocess.run(train_cmd(shards, run_dir, "train.epochs=1"), env=cpu_env(), capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"{newest} is unreadable" in out  # the broken file is reported by name
    # it continued from the one before, not from scratch, and trained only the steps that were missing
    assert f"resumed from {ckpts[1]}: epoch 0, batch {previous} of the epoch, step {previous}" in out, out[-3000:]
    end = steps_per_epoch(shards, 1)
    assert re.findall(r"checkpoint (step-\d+)\.pt \(", out) == [f"step-{end:09d}"]  # from scratch: 7, 14, ...
    state, _ = final_state(run_dir)
    assert state["global_step"] == end > previous
    assert [h["epoch"] for h in state["history"]] == [0]


# The training CLI, SIGKILLed by itself the first time it would point best.pt at a new checkpoint: the
# moment between writing an epoch's checkpoint and linking best.pt to it.
KILLED_BEFORE_LINK = ("import os, signal, sys; import celeba_dist.train.resume as r; "
                      "r.link_best = lambda *a: os.kill(os.getpid(), signal.SIGKILL); "
                      "from celeba_dist.train.main import cli_main; sys.exit(cli_main(sys.argv[1:]))")


def best_step_on_disk(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)["state"]["global_step"]


def test_a_kill_between_the_checkpoint_and_best_pt_is_mended_by_the_same_command(shards, tmp_path):
    run_dir = tmp_path / "link"
    cmd = train_cmd(shards, run_dir, "train.epochs=2")
    proc = subprocess.run([sys.executable, "-c", KILLED_BEFORE_LINK, *cmd[3:]], env=cpu_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    spe = steps_per_epoch(shards, 1)
    assert newest_step(run_dir) == spe and not (run_dir / "checkpoints" / "best.pt").exists()
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"best.pt did not point at the run's best checkpoint step-{spe:09d}.pt" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert best_step_on_disk(run_dir) == metrics["best_step"] in (spe, 2 * spe)


def test_best_weights_lost_by_hand_are_chosen_again_instead_of_failing_every_resume(shards, tmp_path):
    """best.pt deleted by hand after its epoch's checkpoint was pruned: the run says so and the next
    validation sets a new best, instead of failing at its final test on every run of the command."""
    run_dir = tmp_path / "lost"
    run_to_end(train_cmd(shards, run_dir, "train.epochs=1"))
    newest = list_checkpoints(run_dir / "checkpoints")[0]
    ckpt = torch.load(newest, map_location="cpu", weights_only=True)
    # the record of a best that no later epoch beats, at a step whose checkpoint keep_last pruned
    ckpt["state"].update(best_step=1, best_metric=2.0)  # step 1 was never saved
    torch.save(ckpt, newest)
    (run_dir / "checkpoints" / "best.pt").unlink()
    proc = subprocess.run(train_cmd(shards, run_dir, "train.epochs=2"), env=cpu_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "best.pt is missing and the best epoch's checkpoint" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and best_step_on_disk(run_dir) == metrics["best_step"] == 2 * steps_per_epoch(shards, 1)


def test_resuming_with_settings_the_checkpoint_overrides_or_other_shards_is_refused_writing_nothing(shards, tmp_path):
    """A changed learning rate would be ignored (the optimizer's state keeps the old one), another model would
    fail half-way, other shards would mix two datasets: each is refused by name before anything is written,
    and the unchanged command still resumes."""
    run_dir = tmp_path / "run"
    run_to_end(train_cmd(shards, run_dir, "train.epochs=1"))
    files = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "data.json", "env.json")}
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    other = synthetic_shards(tmp_path, num_images=300, samples_per_shard=24, seed=1)
    attempts = {
        "changed": (train_cmd(shards, run_dir, "train.epochs=2", "optim.lr=0.05", "model.name=celeb_cnn"),
                    ["model.name: 'simple_cnn' in the checkpoint, 'celeb_cnn' now",
                     "optim.lr: 0.001 in the checkpoint, 0.05 now"]),
        "other shards": (train_cmd(other, run_dir, "train.epochs=2"),
                         [f"the shards: {other} holds other samples than {shards}"]),
        # as many attributes as before: the weights would load, and the Smiling head would learn Male's labels
        "other attributes": (train_cmd(shards, run_dir, "train.epochs=2", "data.attributes=[Male]"),
                             ["the attributes: [Smiling] in the checkpoint, [Male] now (data.attributes)"]),
    }
    for what, (cmd, expected) in attempts.items():
        started = time.monotonic()
        proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, (what, proc.stdout[-2000:] + proc.stderr[-2000:])
        assert time.monotonic() - started < 60
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("celeba-dist train: error: ") and all(e in last for e in expected), (what, last)
        assert "Traceback" not in proc.stderr
        assert {name: (run_dir / name).read_bytes() for name in files} == files, what
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == checkpoints, what
    # submit refuses the same on the login node, before queueing a job that would only refuse at its start
    for what, data, sets in (("changed", shards, ["optim.lr=0.05"]), ("other shards", other, []),
                             ("fresh start", shards, ["run.resume=none"])):
        proc = subprocess.run([sys.executable, "-m", "celeba_dist", "submit", "--config", "smiling_simple_cnn",
                               "--data", str(data), "--run-dir", str(run_dir), "--set", *COMMON, *sets],
                              env=cpu_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (what, proc.stdout[-2000:] + proc.stderr[-2000:])
        assert proc.stderr.startswith("celeba-dist submit: error: ") and "Traceback" not in proc.stderr, proc.stderr
        assert ("already holds checkpoints" if what == "fresh start" else "cannot be resumed") in proc.stderr, what
        assert not (run_dir / "slurm_jobs.json").exists() and not (run_dir / "slurm").exists(), what
    # and so does a sweep whose member folder holds this run (member 00-lr0.05, linked to it)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "00-lr0.05").symlink_to(run_dir)
    proc = subprocess.run([sys.executable, "-m", "celeba_dist", "sweep", "--config", "smiling_simple_cnn", "--data",
                           str(shards), "--run-dir", str(tmp_path / "sweep"), "--grid", "optim.lr=0.05,0.01",
                           "--set", *COMMON], env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "optim.lr: 0.001 in the checkpoint, 0.05 now" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["00-lr0.05"]  # no sweep.json, no logs
    assert {name: (run_dir / name).read_bytes() for name in files} == files
    run_to_end(train_cmd(shards, run_dir, "train.epochs=2"))
    assert final_state(run_dir)[0]["global_step"] == 2 * steps_per_epoch(shards, 1)


def test_resumed_with_another_batch_size_it_continues_the_epoch_and_the_schedule_where_they_were(shards, tmp_path):
    """A run continued with a larger data.batch_size (another allocation's memory) goes on where it stopped: the
    epoch's position converted to the new batches (3 batches of 8 done: 1 of 16), the learning-rate schedule at
    its step (cosine here, as TensorBoard shows it), not restarted from its first step."""
    run_dir = tmp_path / "run"
    extra = ("sched.name=cosine", "train.log_every_steps=1", "train.eval_splits=[val]")
    run_to_end(train_cmd(shards, run_dir, *extra, "train.max_steps=3"))
    proc = subprocess.run(train_cmd(shards, run_dir, *extra, "train.max_steps=6", "data.batch_size=16"), env=cpu_env(),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "processes × batch 8 on 1 × 16: RNG states reseeded, epoch 0 continues at batch 1" in out, out[-3000:]
    state, _ = final_state(run_dir)
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"], state["batch_size"]) == (0, 4, 6, 16)
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    for step in (4, 5, 6):  # cosine over the 6 steps of train.max_steps, from optim.lr = 1e-3 down to 0
        assert lr[step] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * step / 6)), abs=1e-9), (step, lr)


def signal_when_logged(cmd: list[str], marker: str, sig: signal.Signals) -> tuple[int, str, float]:
    """Run ``cmd``; signal its process group the moment a line of its output holds ``marker``. Returns the
    exit status, the whole output and the seconds from the signal to the end."""
    proc = subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out, sent = [], None
    for line in proc.stdout:
        out.append(line)
        if marker in line:
            os.killpg(proc.pid, sig)
            sent = time.monotonic()
            break
    out += proc.stdout.read()
    proc.wait(timeout=120)
    assert sent is not None, f"no line held {marker!r}: {''.join(out)[-3000:]}"
    return proc.returncode, "".join(out), time.monotonic() - sent


def test_a_stop_signal_while_the_cache_fills_ends_the_run_cleanly_and_it_resumes(shards, tmp_path):
    """A preemption warning (or a cancel: the same path) during the set-up, here the data.cache fill, which
    takes minutes on full CelebA, is a stop request too: exit 75 with a line saying so, not a silent death by
    signal (SLURM's job would not be requeued)."""
    sig = signal.SIGUSR2
    run_dir = tmp_path / "fill"
    cmd = train_cmd(shards, run_dir, "train.epochs=2", "data.cache=host")
    run_to_end(train_cmd(shards, run_dir, "train.epochs=1", "data.cache=host"))
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    returncode, text, took = signal_when_logged(cmd, "cache: filling with", sig)
    assert returncode == 75, text[-3000:]
    assert took < 30
    step = steps_per_epoch(shards, 1)
    assert f"stop requested by {sig.name}" in text and f"before the first step: ending with the run as its newest " \
        f"checkpoint (step {step}) holds it" in text, text[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    run_to_end(cmd)
    assert final_state(run_dir)[0]["global_step"] == 2 * step


def test_a_stop_agreed_at_the_last_step_of_max_steps_still_lets_the_same_command_finish(shards, tmp_path):
    """The ranks agree on stop requests at the train.max_steps step at the latest: a SIGTERM pending then is
    checkpointed there, before that step's validation. The same command must validate it and finish, not skip
    to the final test and fail for want of a best.pt (every rerun the same)."""
    run_dir = tmp_path / "last"
    # no stop check before the last step: a SIGTERM at any moment of the training is agreed at step 10
    cmd = train_cmd(shards, run_dir, "train.max_steps=10", "train.sync_every_steps=1000", "train.log_every_steps=1000",
                    "train.checkpoint_every_steps=0", "train.eval_splits=[val]")
    returncode, text, _ = signal_when_logged(cmd, "optimizer steps", signal.SIGTERM)
    assert returncode == 75 and "stop requested by SIGTERM (terminate): checkpointing at step 10" in text, text[-3000:]
    assert not (run_dir / "checkpoints" / "best.pt").exists()
    run_to_end(cmd)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [10] and metrics["best_step"] == 10


def test_a_cancel_in_the_first_seconds_ends_the_run_at_once_releasing_the_folder(shards, tmp_path):
    """SIGTERM while the run starts (here right after the shard check; under SLURM, a scancel in the job's
    first seconds, which submitit's own handler would ignore): exit 75 before the first step, the lock
    released at once; the same command then trains, and a save some earlier kill left half-written is gone."""
    run_dir = tmp_path / "early"
    cmd = train_cmd(shards, run_dir, "train.epochs=1")
    returncode, text, took = signal_when_logged(cmd, "checked against the manifest", signal.SIGTERM)
    assert returncode == 75, text[-3000:]
    assert took < 20
    assert "stop requested by SIGTERM (terminate) before the first step" in text, text[-3000:]
    assert not (run_dir / ".lock").exists() and not (run_dir / "checkpoints").exists()
    partial = run_dir / "checkpoints" / ".step-000000007.pt.4242.tmp"  # what a SIGKILL during a save leaves
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half a checkpoint")
    run_to_end(cmd)
    assert not partial.exists() and final_state(run_dir)[0]["global_step"] == steps_per_epoch(shards, 1)


def _with_default_sigint() -> None:
    """In the child: SIGINT kills or is handled, even if this test runs where it is ignored (a shell's
    background job), so the child sees a Ctrl-C as a terminal would deliver it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_run(cmd: list[str], run_dir: Path, *, after_step: int = 1) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own; return once a checkpoint at or past ``after_step`` exists."""
    proc = subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_with_default_sigint)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and newest_step(run_dir) < after_step:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT (Ctrl-C)", "SIGHUP (terminal closed)"])
def test_stop_signal_checkpoints_at_the_next_step_and_exits_75(shards, tmp_path, sig):
    run_dir = tmp_path / "term"
    # stop requests are agreed at every train.sync_every_steps step, not only at log lines or checkpoints
    cmd = train_cmd(shards, run_dir, "train.sync_every_steps=1", "train.checkpoint_every_steps=1000",
                    "train.log_every_steps=1000")
    proc = start_run(cmd, run_dir)  # the first checkpoint comes at the end of epoch 0
    os.killpg(proc.pid, sig)  # the whole group, loader workers included, as SLURM and a terminal do
    sent = time.monotonic()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:] + err[-3000:]
    assert time.monotonic() - sent < 30
    assert f"stop requested by {sig.name}" in out and "Traceback" not in out + err
    assert not (run_dir / "metrics.json").exists()
    state, _ = final_state(run_dir)
    spe = steps_per_epoch(shards, 1)
    assert spe < state["global_step"] < 2 * spe  # saved in epoch 1, steps after the epoch-0 checkpoint
    run_to_end(cmd)
    assert final_state(run_dir)[0]["global_step"] == 3 * spe


def test_ctrl_c_under_accelerate_launch_checkpoints_every_rank_at_one_step(shards, tmp_path):
    """A terminal's Ctrl-C reaches the launcher (each rank runs in a session of its own), which forwards
    a SIGINT to every rank at once: the ranks agree on the stop, save one checkpoint together and end;
    the same command resumes."""
    run_dir = tmp_path / "ctrl-c"
    cmd = train_cmd(shards, run_dir, "train.sync_every_steps=1", "train.checkpoint_every_steps=1000",
                    "train.epochs=2", processes=2)
    proc = start_run(cmd, run_dir)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:] + err[-3000:]  # the launcher's: 128 + SIGINT
    assert time.monotonic() - sent < 30
    logs = [(run_dir / "logs" / f"rank{r}.log").read_text() for r in (0, 1)]
    stops = [re.findall(r"stop requested by SIGINT \(terminate\): checkpointing at step (\d+)", log) for log in logs]
    assert stops[0] == stops[1] and len(stops[0]) == 1, stops
    spe = steps_per_epoch(shards, 2)
    state, _ = final_state(run_dir)
    assert state["global_step"] == int(stops[0][0]) and spe < state["global_step"] < 2 * spe
    assert not (run_dir / "metrics.json").exists()
    run_to_end(cmd)
    assert final_state(run_dir)[0]["global_step"] == 2 * spe


def test_ctrl_c_pressed_again_stops_at_once_without_a_checkpoint_and_resumes(shards, tmp_path):
    """A second Ctrl-C, seconds after the first, gives up the checkpoint: exit 130 at once, one line
    naming the checkpoint to resume from, no traceback, the lock released."""
    run_dir = tmp_path / "twice"
    # stop requests are polled every 1000 steps only: the first Ctrl-C stays pending
    extra = ("train.sync_every_steps=1000", "train.log_every_steps=1000", "train.checkpoint_every_steps=0",
             "train.epochs=6")
    cmd = train_cmd(shards, run_dir, *extra)
    proc = start_run(cmd, run_dir)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(signals.FORCE_AFTER_S + 0.5)
    assert proc.poll() is None, "the first Ctrl-C alone ended the run"
    before = newest_step(run_dir)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:] + err[-3000:]
    assert time.monotonic() - sent < 10
    newest = list_checkpoints(run_dir / "checkpoints")[0]
    assert f"celeba-dist train: interrupted; the newest intact checkpoint is {newest}" in err
    assert "Traceback" not in out + err and "interrupted again" in (run_dir / "logs" / "rank0.log").read_text()
    spe = steps_per_epoch(shards, 1)
    assert newest_step(run_dir) == before and before % spe == 0  # only epoch-end checkpoints: none at the Ctrl-C
    run_to_end(cmd)
    assert final_state(run_dir)[0]["global_step"] == 6 * spe


class _RunsCode:
    """What a tampered checkpoint would hold: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_tampered_checkpoint_is_refused_everywhere_and_never_runs(shards, tmp_path):
    """A checkpoint whose pickle would run code: resume, eval and predict refuse it by name, exit 1 at
    once, write nothing, and the code does not run; the run's good checkpoints are untouched."""
    run_dir = tmp_path / "run"
    cmd = train_cmd(shards, run_dir, "train.epochs=1")
    run_to_end(cmd)
    ckpts = list_checkpoints(run_dir / "checkpoints")
    marker = tmp_path / "code-ran"
    good = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    tampered = run_dir / "checkpoints" / f"step-{int(ckpts[0].stem.split('-')[1]) + 1:09d}.pt"
    torch.save({**good, "state": _RunsCode(marker)}, tampered)
    (run_dir / "metrics.json").unlink()
    before = sorted(p.name for p in run_dir.rglob("*"))
    commands = {
        "resume": cmd,
        "eval": [sys.executable, "-m", "celeba_dist", "eval", "--checkpoint", str(tampered), "--out",
                 str(tmp_path / "eval.json")],
        "predict": [sys.executable, "-m", "celeba_dist", "predict", "--checkpoint", str(tampered), "--input",
                    str(shards), "--split", "test", "--out", str(tmp_path / "pred.csv")],
    }
    for name, command in commands.items():
        started = time.monotonic()
        proc = subprocess.run(command, env=cpu_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, (name, proc.stderr[-2000:])
        assert time.monotonic() - started < 60
        last = proc.stderr.strip().splitlines()[-1]
        assert f"checkpoint {tampered} refused" in last and "posix.system" in last, (name, last)
        assert "Traceback" not in proc.stderr, name
        assert not marker.exists(), f"{name} ran the checkpoint's code"
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "pred.csv").exists()
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # nothing written, nothing pruned
    # the user deletes the file, and the same command resumes from the good checkpoint and finishes
    tampered.unlink()
    run_to_end(cmd)
    assert (run_dir / "metrics.json").is_file() and not marker.exists()


def test_checkpoints_of_earlier_versions_with_numpy_rng_states_still_load(tmp_path):
    """Earlier checkpoints stored numpy's RNG state as a numpy array: data, not code, so it is allowed."""
    import numpy as np

    from celeba_dist.train.checkpoint import load_checkpoint, set_rng_state

    np.random.seed(3)
    legacy = {"model": {"w": torch.ones(2)}, "state": {"epoch": 1}, "config": {},
              "rng": [{"python": __import__("random").getstate(), "numpy": np.random.get_state(),
                       "torch": torch.get_rng_state()}]}
    path = tmp_path / "step-000000001.pt"
    torch.save(legacy, path)
    expected = np.random.rand()
    ckpt = load_checkpoint(path)
    set_rng_state(ckpt["rng"][0])
    assert np.random.rand() == expected
