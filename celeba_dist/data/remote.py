"""Shards over HTTP(S) or ``pipe:``: ``data.root`` may be a URL, or ``pipe:CMD`` with ``{}`` where the
file's path goes (``pipe:aws s3 cp s3://bucket/shards/{} -``), whose ``manifest.json`` names the shards
relatively, as a local folder's does.

Remote files stream through webdataset's ``Pipe`` (around ``curl`` for HTTP(S), around a shell for
``pipe:``, as its own openers do) and webdataset's tar iterator, grouped into samples by the same rule as
the local mmap reader. A reader that sends nothing for :data:`STALL_S` while we wait on it is killed
(:class:`_Watched`), and its read fails. A read that fails (a server gone, a stream cut short, a stall) is
retried from the start of the shard, skipping the samples already delivered; after the last attempt the
run ends with a :class:`DataError` naming the URL. The dealing to slots and the exact evaluation counts
are the local ones: only the reader differs.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import tarfile
import threading
import time
from pathlib import Path
from typing import Iterator

import webdataset as wds
from webdataset.gopen import Pipe

from celeba_dist.shards.layout import group_members

log = logging.getLogger(__name__)

PREFIXES = ("http://", "https://", "pipe:")
ATTEMPTS = 3  # reads of one shard before the run gives up on it
BACKOFF_S = 1.0  # before the second attempt; doubled each time
# A reader (curl, or the pipe: command) that sends no byte for this long while the loader waits on it is
# killed and the attempt fails: a server or a command that stalls would otherwise hold the run for ever.
# Time the loader spends elsewhere (decoding, or blocked while training catches up) does not count.
# CELEBA_DIST_REMOTE_STALL_S changes it (seconds).
STALL_S = 60
CONNECT_TIMEOUT_S = 30


class RemoteReadError(OSError):
    """A remote file could not be read after :data:`ATTEMPTS` attempts; the message names its URL."""


def is_remote(root: str) -> bool:
    return str(root).startswith(PREFIXES)


def remote_join(root: str, relative: str) -> str:
    """The URL of ``relative`` (``train/x.tar``, ``manifest.json``) under a remote root."""
    if root.startswith("pipe:"):
        if "{}" not in root:
            raise ValueError(f"data.root={root!r}: a pipe: root needs {{}} where the file's path goes, "
                             "e.g. pipe:aws s3 cp s3://bucket/shards/{} -")
        return root.replace("{}", relative)
    return root.rstrip("/") + "/" + relative


_CURL_STATUS = {6: "cannot resolve the host", 7: "cannot connect", 18: "transfer cut short", 22: "HTTP error",
                28: "timed out", 56: "connection lost"}


def _reason(exc: BaseException) -> str:
    """webdataset's reader errors, shortened: its pipe reports the whole command line and an exit status."""
    found = re.search(r"exit (\d+) \(read\)", str(exc))
    if not found:
        return f"{type(exc).__name__}: {exc}"
    status = int(found.group(1))
    reader = "curl" if "'curl'" in str(exc) else "the pipe command"
    return f"{reader} exited with status {status}" + (f" ({_CURL_STATUS[status]})" if reader == "curl" and
                                                      status in _CURL_STATUS else "")


def _attempts(url: str, what: str) -> Iterator[int]:
    """Attempt numbers, sleeping between them; the caller raises after the last one."""
    for attempt in range(1, ATTEMPTS + 1):
        if attempt > 1:
            delay = BACKOFF_S * 2 ** (attempt - 2)
            log.warning("reading %s %s failed; attempt %d of %d in %.0fs", what, url, attempt, ATTEMPTS, delay)
            time.sleep(delay)
        yield attempt


def stall_limit() -> float:
    return float(os.environ.get("CELEBA_DIST_REMOTE_STALL_S", STALL_S))


def open_remote(url: str) -> "_Watched":
    """A read stream of ``url``: curl (HTTP(S)) with a connect limit, or the ``pipe:`` command, under the
    stall limit."""
    if url.startswith(("http://", "https://")):
        args = ["curl", "--connect-timeout", str(CONNECT_TIMEOUT_S), "-f", "-s", "-L", url]
        pipe = Pipe(args, mode="rb", bufsize=8192, ignore_status=[141, 23])  # webdataset's own: SIGPIPE, write error
        return _Watched(pipe, "curl", stall_limit(), url)
    pipe = Pipe(url[len("pipe:"):], mode="rb", shell=True, bufsize=8192, ignore_status=[141])  # as wds.gopen
    return _Watched(pipe, "the pipe command", stall_limit(), url)


class _Watched:
    """A :class:`Pipe`'s read stream whose reader, and everything it started, is killed once a read has
    waited ``stall_s`` for a byte; that read, and the close, then raise :class:`TimeoutError`.

    Reads take what the pipe has (``read1``) until they have the bytes asked for, so a slow but moving
    transfer never counts as a stall; only the time spent waiting inside a read does.
    """

    def __init__(self, pipe: Pipe, reader: str, stall_s: float, url: str):
        self.pipe, self.reader, self.stall_s, self.url = pipe, reader, stall_s, url
        self.waiting_since: float | None = None
        self.stalled, self._closed = False, threading.Event()
        threading.Thread(target=self._watch, name="remote-stall", daemon=True).start()

    def __str__(self) -> str:  # webdataset's tar reader names its stream in the errors it passes on
        return self.url

    def _watch(self) -> None:
        while not self._closed.wait(min(1.0, self.stall_s / 4)):
            since = self.waiting_since
            if since is not None and time.monotonic() - since > self.stall_s:
                self.stalled = True
                _kill_tree(self.pipe.proc.pid)
                return

    def _stall_error(self) -> TimeoutError:
        return TimeoutError(f"{self.reader} sent nothing for {self.stall_s:g}s (the stall limit, "
                            "CELEBA_DIST_REMOTE_STALL_S)")

    def read(self, n: int = -1) -> bytes:
        chunks, wanted = [], n
        while wanted != 0:
            self.waiting_since = time.monotonic()
            try:
                chunk = self.pipe.stream.read1(wanted if wanted > 0 else 1 << 20)
            finally:
                self.waiting_since = None
            if self.stalled:
                raise self._stall_error()
            if not chunk:
                break
            chunks.append(chunk)
            wanted = wanted - len(chunk) if wanted > 0 else wanted
        self.pipe.check_status()
        return b"".join(chunks)

    def close(self) -> None:
        self._closed.set()
        try:
            self.pipe.close()
        except OSError:
            if not self.stalled:
                raise
        if self.stalled:
            raise self._stall_error()

    def __enter__(self) -> "_Watched":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (a shell's pipeline holds the pipe open too), children first found."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        found.append(parent)
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
    for victim in found:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def fetch(url: str) -> bytes:
    """The whole file at ``url`` (the manifest), with retries."""
    for attempt in _attempts(url, "file"):
        try:
            with open_remote(url) as stream:
                data = stream.read()
            return data
        except (OSError, ValueError) as exc:
            if attempt == ATTEMPTS:
                raise RemoteReadError(f"cannot read {url} after {ATTEMPTS} attempts: {_reason(exc)}") from exc
    raise AssertionError("unreachable")


def _samples(url: str, fields: frozenset[str] | None) -> Iterator[dict]:
    stream = open_remote(url)
    try:
        members = ((m["fname"], m["data"]) for m in wds.tariterators.tar_file_iterator(stream))
        yield from group_members(members, url, fields)
    finally:
        stream.close()


def iter_remote_samples(url: str, fields: frozenset[str] | None = None) -> Iterator[dict]:
    """webdataset-style samples of the remote tar at ``url``, as :func:`celeba_dist.shards.tario.iter_samples`
    gives them for a local one; a failed read restarts the shard and skips what was delivered."""
    delivered = 0
    for attempt in _attempts(url, "shard"):
        try:
            for index, sample in enumerate(_samples(url, fields)):
                if index >= delivered:
                    delivered += 1
                    yield sample
            return
        except (OSError, ValueError, tarfile.TarError) as exc:
            if attempt == ATTEMPTS:
                raise RemoteReadError(f"cannot read shard {url} after {ATTEMPTS} attempts "
                                      f"({delivered} samples read): {_reason(exc)}") from exc
