"""Shards over HTTP(S) or ``pipe:``: ``data.root`` may be a URL, or ``pipe:CMD`` with ``{}`` where the
file's path goes (``pipe:aws s3 cp s3://bucket/shards/{} -``), whose ``manifest.json`` names the shards
relatively, as a local folder's does.

Remote files stream through webdataset's own openers (its ``Pipe`` around ``curl`` for HTTP(S), with a
stall limit webdataset's default curl line lacks; its ``gopen`` shell for ``pipe:``) and webdataset's tar iterator, grouped into samples by the same rule as the local mmap
reader. A read that fails (a server gone, a stream cut short) is retried from the start of the shard,
skipping the samples already delivered; after the last attempt the run ends with a :class:`DataError`
naming the URL. The dealing to slots and the exact evaluation counts are the local ones: only the reader
differs.
"""
from __future__ import annotations

import logging
import os
import re
import tarfile
import time
from typing import Iterator

import webdataset as wds
from webdataset.gopen import Pipe

from celeba_dist.shards.layout import group_members

log = logging.getLogger(__name__)

PREFIXES = ("http://", "https://", "pipe:")
ATTEMPTS = 3  # reads of one shard before the run gives up on it
BACKOFF_S = 1.0  # before the second attempt; doubled each time
# An HTTP(S) transfer that moves less than a byte a second for this long fails (curl status 28) and is retried:
# a server that accepts and then stalls would otherwise hold the run for ever. CELEBA_DIST_REMOTE_STALL_S
# changes it (seconds).
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


def open_remote(url: str):
    """A read stream of ``url``: curl (HTTP(S)) with connect and stall limits, or the ``pipe:`` command."""
    if not url.startswith(("http://", "https://")):
        return wds.gopen(url, "rb")
    stall = int(float(os.environ.get("CELEBA_DIST_REMOTE_STALL_S", STALL_S)))
    args = ["curl", "--connect-timeout", str(CONNECT_TIMEOUT_S), "--speed-limit", "1", "--speed-time", str(stall),
            "-f", "-s", "-L", url]
    return Pipe(args, mode="rb", bufsize=8192, ignore_status=[141, 23])  # webdataset's own: SIGPIPE, write error


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
