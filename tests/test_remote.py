"""Shards over HTTP: a local ``python -m http.server`` on 127.0.0.1 serves the packed folder.

Training and evaluation from the URL give the very numbers of the local folder (one and two processes);
a server that goes away mid-epoch ends the run within seconds naming the URL, and once it is back the
same command resumes.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from test_resume import newest_step
from test_train import accelerate_cmd, cpu_env

COMMON = ["data.batch_size=8", "data.num_workers=1", "data.image_size=[32, 32]", "log.progress_bar=false",
          "log.image_grid_size=0", "train.deterministic=true", "train.log_every_steps=5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m http.server`` over ``folder``, startable and stoppable on one port."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, _free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                      "--directory", str(self.folder)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("http.server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server(pristine):
    srv = Server(pristine.parent)
    srv.start()
    yield srv
    srv.stop()


def train(data: str, run_dir: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    args = ["-m", "celeba_dist.train", "--config", "smiling_simple_cnn", "--data", data, "--run-dir", str(run_dir),
            "--set", *COMMON, *extra]
    cmd = accelerate_cmd(*args, processes=processes) if processes > 1 else [sys.executable, *args]
    return subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(pristine, tmp_path_factory) -> Path:
    """A 1-epoch run on the local folder, which the evaluation tests below only read."""
    run_dir = tmp_path_factory.mktemp("remote-trained") / "run"
    proc = train(str(pristine), run_dir, "train.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def outcome(run_dir: Path) -> tuple[dict, list[int]]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stats = sorted(run_dir.glob("rank_stats/rank*.json"))
    return {s: metrics[s] for s in ("val", "test")}, [json.loads(p.read_text())["samples_seen"] for p in stats]


@pytest.mark.parametrize("processes", [1, 2])
def test_training_and_eval_over_http_equal_the_local_folder(pristine, server, tmp_path, processes):
    url = f"{server.url}/{pristine.name}"
    local, remote = tmp_path / "local", tmp_path / "remote"
    for data, run_dir in ((str(pristine), local), (url, remote)):
        proc = train(data, run_dir, "train.epochs=2", processes=processes)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert outcome(remote) == outcome(local)
    assert json.loads((remote / "data.json").read_text())["root"] == url
    evals = {}
    for name, data in (("local", str(pristine)), ("remote", url)):
        out = tmp_path / f"eval-{name}.json"
        proc = subprocess.run([sys.executable, "-m", "celeba_dist", "eval", "--run", str(local), "--data", data,
                               "--split", "test", "--out", str(out)], env=cpu_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        evals[name] = {k: v for k, v in json.loads(out.read_text()).items() if k in ("mean", "attributes")}
    assert evals["remote"] == evals["local"] and evals["remote"]["mean"]["num_samples"] > 0


def test_a_server_gone_mid_epoch_ends_the_run_naming_the_url_then_it_resumes(pristine, server, tmp_path):
    url = f"{server.url}/{pristine.name}"
    run_dir = tmp_path / "run"
    args = ["-m", "celeba_dist.train", "--config", "smiling_simple_cnn", "--data", url, "--run-dir", str(run_dir),
            "--set", *COMMON, "train.epochs=2", "train.checkpoint_every_steps=5",
            "data.shuffle_buffer=8"]  # a small buffer: the loader reads training shards as the epoch goes
    proc = subprocess.Popen([sys.executable, *args], env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while newest_step(run_dir) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the server could go away"
    server.stop()
    gone = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - gone
    assert proc.returncode == 1, stderr[-3000:]
    assert took < 60, took  # 3 attempts, 1 s and 2 s apart, each refused at once
    last = stderr.strip().splitlines()[-1]
    assert f"cannot read shard {url}/train/" in last and "after 3 attempts" in last, last
    assert "curl exited with status 7 (cannot connect)" in last, last
    assert not (run_dir / "metrics.json").exists() and not list(run_dir.rglob("*.tmp"))
    assert newest_step(run_dir) >= 5  # the checkpoints written before are kept
    server.start()
    resumed = subprocess.run([sys.executable, *args], env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints'}" in resumed.stderr + resumed.stdout
    assert (run_dir / "metrics.json").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["history"][-1]["epoch"] == 1


def _cut_at_sample(shard: Path, sample: int) -> None:
    """Cut a shard where its ``sample``-th sample's first member begins: a tar that still reads cleanly,
    only shorter than the manifest says (a remote shard's size cannot be checked before the run)."""
    with tarfile.open(shard) as tar:
        starts = {}
        for member in tar.getmembers():
            starts.setdefault(member.name.split(".")[0], member.offset)
    with open(shard, "r+b") as fh:
        fh.truncate(list(starts.values())[sample])


def test_a_remote_shard_shorter_than_the_manifest_ends_train_and_eval_naming_it(pristine, trained, tmp_path):
    folder = tmp_path / "www" / "shards"
    shutil.copytree(pristine, folder)
    train_shard, test_shard = sorted((folder / "train").glob("*.tar"))[2], sorted((folder / "test").glob("*.tar"))[0]
    for shard in (train_shard, test_shard):
        _cut_at_sample(shard, 4)
    srv = Server(folder.parent)
    srv.start()
    try:
        url = f"{srv.url}/shards"
        run_dir = tmp_path / "run"
        started = time.monotonic()
        proc = train(url, run_dir, "train.epochs=1")
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert time.monotonic() - started < 120
        last = proc.stderr.strip().splitlines()[-1]
        assert f"shard {url}/train/{train_shard.name} ends after 4 samples, but the manifest lists at least 16" in last
        assert not (run_dir / "metrics.json").exists() and not list(run_dir.rglob("*.tmp"))
        out = tmp_path / "eval.json"
        proc = subprocess.run([sys.executable, "-m", "celeba_dist", "eval", "--run", str(trained), "--data", url,
                               "--split", "test", "--out", str(out)], env=cpu_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 1 and f"shard {url}/test/{test_shard.name} ends after 4 samples" in proc.stderr
        assert not out.exists()
        for shard in (train_shard, test_shard):  # uploaded again: the same command now trains to the end
            shutil.copy(pristine / shard.parent.name / shard.name, shard)
        proc = train(url, run_dir, "train.epochs=1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (run_dir / "metrics.json").is_file()
    finally:
        srv.stop()


def test_pipe_root_evaluates_like_the_local_folder(pristine, trained, tmp_path):
    """``pipe:CMD`` with {} for the file's path (here ``cat``), through webdataset's pipe opener."""
    run_dir = trained
    evals = {}
    for name, data in (("local", str(pristine)), ("pipe", f"pipe:cat {pristine}/{{}}")):
        out = tmp_path / f"{name}.json"
        proc = subprocess.run([sys.executable, "-m", "celeba_dist", "eval", "--run", str(run_dir), "--data", data,
                               "--split", "val", "--out", str(out)], env=cpu_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        evals[name] = json.loads(out.read_text())["attributes"]
    assert evals["pipe"] == evals["local"]
    bad = subprocess.run([sys.executable, "-m", "celeba_dist", "eval", "--run", str(run_dir), "--data",
                          f"pipe:cat {pristine}/manifest.json", "--split", "val"], env=cpu_env(), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "needs {} where the file's path goes" in bad.stderr


STALLING_SERVER = r"""
import http.server, os, sys, time
folder, port, flag = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=folder, **kwargs)

    def do_GET(self):
        if "/val/" in self.path and os.path.exists(flag):  # accept, send half a header's worth, then nothing
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\0" * 512)
            self.wfile.flush()
            time.sleep(600)
            return
        super().do_GET()

http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def test_a_server_that_stalls_fails_the_read_in_seconds_then_the_same_command_works(pristine, trained, tmp_path):
    """A server that accepts and then sends nothing would hold a run for ever: the stall limit
    (CELEBA_DIST_REMOTE_STALL_S, 60 s by default; 2 s here) kills curl and fails each attempt, and after
    the third the command exits 1 naming the shard's URL; once the server serves again, the same command
    succeeds."""
    run_dir = trained
    flag, port = tmp_path / "stall", _free_port()
    flag.touch()
    srv = subprocess.Popen([sys.executable, "-c", STALLING_SERVER, str(pristine.parent), str(port), str(flag)])
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/{pristine.name}"
        out = tmp_path / "val.json"
        cmd = [sys.executable, "-m", "celeba_dist", "eval", "--run", str(run_dir), "--data", url, "--split", "val",
               "--out", str(out), "--set", "data.num_workers=1"]
        env = {**cpu_env(), "CELEBA_DIST_REMOTE_STALL_S": "2"}
        started = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert took < 45, took  # 3 attempts of 2 s without a byte, 1 s and 2 s apart, and the start-up
        last = proc.stderr.strip().splitlines()[-1]
        assert f"cannot read shard {url}/val/" in last and "curl sent nothing for 2s (the stall limit" in last, last
        assert not out.exists() and not list(tmp_path.glob("*.tmp"))
        flag.unlink()  # the server serves again
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads(out.read_text())["mean"]["num_samples"] == json.loads(
            (pristine / "manifest.json").read_text())["splits"]["val"]["num_samples"]
    finally:
        srv.kill()
        srv.wait()


def _processes_with(marker: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(cmdline.parent.name)
        except OSError:
            continue
    return found


def test_a_pipe_command_that_stalls_is_killed_and_fails_the_read_then_the_same_command_works(pristine, trained, tmp_path):
    """A ``pipe:`` command that sends half a header and then hangs (here a shell pipeline whose ``sleep``
    holds the pipe open) is killed with everything it started once it has sent nothing for the stall
    limit; after three attempts the command exits 1 naming the shard, and nothing of the pipeline is left.
    Once the command streams again, the same command runs through."""
    run_dir = trained
    flag, marker = tmp_path / "stall", "2417.5"  # sleep's argument marks the pipeline's processes
    flag.touch()
    root = (f"pipe:if [ -e {flag} ] && [ {{}} != manifest.json ]; then head -c 512 {pristine}/{{}}; "
            f"sleep {marker}; else cat {pristine}/{{}}; fi")
    out = tmp_path / "val.json"
    cmd = [sys.executable, "-m", "celeba_dist", "eval", "--run", str(run_dir), "--data", root, "--split", "val",
           "--out", str(out), "--set", "data.num_workers=1", "data.batch_size=4"]
    env = {**cpu_env(), "CELEBA_DIST_REMOTE_STALL_S": "2"}
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert took < 45, took  # 3 attempts of 2 s without a byte, 1 s and 2 s apart, and the start-up
    last = proc.stderr.strip().splitlines()[-1]
    assert "cannot read shard pipe:" in last and "/val/" in last, last
    assert "the pipe command sent nothing for 2s (the stall limit" in last, last
    assert not _processes_with(f"sleep {marker}")
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    flag.unlink()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(out.read_text())["mean"]["num_samples"] == json.loads(
        (pristine / "manifest.json").read_text())["splits"]["val"]["num_samples"]


def test_the_stall_limit_counts_only_the_time_a_read_waits(tmp_path, monkeypatch):
    """A reader that pauses under the limit between bytes, and a consumer that stops reading for longer
    than the limit (decoding, or blocked while training catches up), are no stall."""
    from celeba_dist.data.remote import open_remote

    monkeypatch.setenv("CELEBA_DIST_REMOTE_STALL_S", "1")
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 64)
    with open_remote(f"pipe:head -c 100 {data}; sleep 0.6; tail -c +101 {data}") as stream:
        first = stream.read(10)
        time.sleep(2.5)  # the consumer is away for more than twice the limit
        rest = stream.read()
    assert first + rest == data.read_bytes()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="the pipe command sent nothing for 1s"):
        with open_remote(f"pipe:head -c 100 {data}; sleep 30") as stream:
            stream.read()
    assert time.monotonic() - started < 5  # the shell and its sleep are killed: the pipe closes at once


FAILS_ONCE = """#!/bin/sh
# cat "$1", but the first read of each shard sends half of it and fails, as a connection cut mid-file would
tries="$(dirname "$0")/tries-$(basename "$1")"
n=$(cat "$tries" 2>/dev/null || echo 0)
echo $((n + 1)) > "$tries"
case "$1" in *.tar) if [ "$n" = 0 ]; then head -c $(( $(wc -c < "$1") / 2 )) "$1"; exit 1; fi;; esac
exec cat "$1"
"""


def test_a_read_cut_mid_shard_is_retried_and_every_sample_comes_once(pristine, tmp_path, monkeypatch):
    """A remote shard whose first read fails half-way: the retry reads it again from its start and delivers
    only the samples after those already delivered, so evaluation sees the local folder's samples, each once,
    with the same labels."""
    import torch

    from celeba_dist.data import remote
    from celeba_dist.data.streams import ShardData, eval_stream, make_loader
    from celeba_dist.data.transforms import build_transform

    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    script = tmp_path / "fails_once.sh"
    script.write_text(FAILS_ONCE)
    transform = build_transform("crop178_resize", image_size=(16, 16), train=False)
    got = {}
    for name, root in (("local", str(pristine)), ("pipe", f"pipe:sh {script} {pristine}/{{}}")):
        data = ShardData(root, ["Smiling", "Male"])
        batches = list(make_loader(eval_stream(data, "val", transform, batch_size=5, rank=0, world_size=1),
                                   num_workers=0))
        got[name] = ([k for b in batches for k in b.keys], torch.cat([b.labels for b in batches]))
    assert got["pipe"][0] == got["local"][0] and len(got["local"][0]) == data.split("val").num_samples
    assert torch.equal(got["pipe"][1], got["local"][1])
    shards = sorted(p.name for p in (pristine / "val").glob("*.tar"))
    assert sorted(p.name for p in tmp_path.glob("tries-*.tar")) == [f"tries-{s}" for s in shards]
    assert all((tmp_path / f"tries-{s}").read_text().strip() == "2" for s in shards)  # each failed once
