"""Interrupted and killed runs: what a pack may clear up after one, and workers that die with their parent.

``pack`` removes only the temporary files a killed pack of its own leaves (``celeba-<split>-NNNNNN.tar.tmp``,
``..pack-progress.json.<pid>.tmp``, ``.manifest.json.<pid>.tmp``), and only once the folder is accepted.
A ``pack`` or ``synth`` killed with SIGKILL takes its worker processes with it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from celeba_dist.pack.cli import main
from celeba_dist.shards.manifest import MANIFEST_NAME
from helpers_celeba import tree_state, write_celeba

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the kernel's parent-death "
                                                                             "signal is Linux only")


def test_a_refused_folder_keeps_the_users_tmp_files(tmp_path, capsys):
    src = write_celeba(tmp_path / "src", num_images=10)
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "notes.tmp").write_text("x")
    (out / "train" / "mydraft.tmp").write_text("y")
    (out / "train" / "celeba-train-000000.tar.tmp").write_text("z")  # an unfinished shard, but of no pack here
    (out / "train" / "other.tar").write_bytes(b"")
    state = tree_state(out)
    assert main([str(src.source), str(out), "--workers", "1"]) == 1
    assert "holds shards that no pack progress record describes" in capsys.readouterr().err
    assert tree_state(out) == state, "a refused folder is left exactly as it was"


def test_a_resumed_pack_clears_only_its_own_temporaries(tmp_path, capsys):
    src = write_celeba(tmp_path / "src", num_images=10)
    out = tmp_path / "out"
    assert main([str(src.source), str(out), "--workers", "1", "--samples-per-shard", "3"]) == 0
    (out / "train" / "celeba-train-000001.tar").unlink()  # lost: the resumed run rewrites it
    own = [out / "train" / "celeba-train-000001.tar.tmp", out / "train" / "celeba-train-000007.tar.tmp",
           out / ".manifest.json.4242.tmp", out / "..pack-progress.json.4242.tmp"]
    users = [out / "notes.tmp", out / "train" / "mydraft.tmp", out / "train" / "celeba-val-000000.tar.tmp",
             out / ".manifest.json.tmp", out / "val" / "x.tar.tmp"]
    for path in own + users:
        path.write_text("left over")
    assert main([str(src.source), str(out), "--workers", "1", "--samples-per-shard", "3"]) == 0
    capsys.readouterr()
    assert [p.name for p in own if p.exists()] == []
    assert all(p.read_text() == "left over" for p in users)
    assert (out / "train" / "celeba-train-000001.tar").is_file() and (out / MANIFEST_NAME).is_file()


# -- a SIGKILLed parent -------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_parent_and_watch_workers(command: list[str], workers: int) -> list[int]:
    """Start ``command``, SIGKILL it (only it) once its ``workers`` processes run; return those still
    alive 10 s later (and kill them, so that a failure leaks nothing)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(kids) < workers and proc.poll() is None and time.monotonic() < deadline:
            kids = _children(proc.pid)
            time.sleep(0.01)
        assert len(kids) == workers and proc.poll() is None, f"workers {kids}, parent exit {proc.poll()}"
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(map(_alive, kids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return [k for k in kids if _alive(k)]
    finally:
        for pid in [proc.pid, *kids]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@linux_only
def test_a_sigkilled_pack_takes_its_workers_along(tmp_path):
    src = write_celeba(tmp_path / "src", num_images=12)
    blocking = src.image_path(4)  # a named pipe nobody writes: its reader waits, so the pack is surely mid-run
    blocking.unlink()
    os.mkfifo(blocking)
    command = [sys.executable, "-m", "celeba_dist", "pack", str(src.source), str(tmp_path / "out"), "--workers", "2"]
    assert _kill_parent_and_watch_workers(command, 2) == [], "workers outlived their SIGKILLed parent"


@linux_only
def test_a_sigkilled_synth_takes_its_workers_along(tmp_path):
    command = [sys.executable, "-m", "celeba_dist", "synth", str(tmp_path / "celeba"), "--num-images", "4000",
               "--workers", "2"]
    assert _kill_parent_and_watch_workers(command, 2) == [], "workers outlived their SIGKILLed parent"


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"{path} never appeared (exit {proc.poll()})"
        time.sleep(0.05)


def test_one_pack_per_output_folder_and_a_killed_packs_lock_is_taken_over(tmp_path):
    """A second pack into a folder a live pack writes stops at once naming it, changing nothing; the first
    finishes untouched. The lock of a SIGKILLed pack (same host, its pid gone) is taken over by the same command."""
    src = write_celeba(tmp_path / "src", num_images=12)
    image = src.image_path(4)
    jpeg = image.read_bytes()
    image.unlink()
    os.mkfifo(image)  # the first pack waits on it, mid-run, holding the folder
    out = tmp_path / "out"
    command = [sys.executable, "-m", "celeba_dist", "pack", str(src.source), str(out), "--workers", "1",
               "--samples-per-shard", "2"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "train" / "celeba-train-000000.tar", first)  # the shard of images 1-2 is written
        before = tree_state(out)
        started = time.monotonic()
        second = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and time.monotonic() - started < 30, second.stderr
        refusal = f"celeba-dist pack: error: output folder {out} is in use by another pack: pid {first.pid} "
        assert refusal in second.stderr, second.stderr
        assert tree_state(out) == before, "the refused pack changed the folder"
        with open(image, "wb") as fifo:
            fifo.write(jpeg)
        assert first.wait(timeout=60) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    assert not (out / ".lock").exists() and subprocess.run(command, capture_output=True, timeout=60).returncode == 0

    killed_out = tmp_path / "killed"
    image.unlink()
    os.mkfifo(image)
    killed = subprocess.Popen([*command[:5], str(killed_out), *command[6:]], stderr=subprocess.PIPE, text=True)
    _wait_for(killed_out / ".lock", killed)
    killed.kill()
    killed.wait(timeout=30)
    image.unlink()
    image.write_bytes(jpeg)
    again = subprocess.run([*command[:5], str(killed_out), *command[6:]], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    said = again.stdout + again.stderr
    assert f"taking over the lock of pid {killed.pid}" in said and "no longer runs" in said, said
    assert not (killed_out / ".lock").exists()
