"""Writing one shard: a byte-for-byte reproducible tar, complete on disk or not there at all.

Fixed tar metadata (owner, mode, mtime) makes two packs of the same plan identical. A shard is
written under ``<name>.tmp``, fsynced and renamed only when complete, so readers and resumed runs
never see half of one.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from celeba_dist.diskio import fsync_dir, translate_disk_full
from celeba_dist.shards.layout import shard_file
from celeba_dist.shards.manifest import file_sha256

SHARD_MTIME = 946684800  # 2000-01-01: fixed tar metadata makes the shards byte-identical across runs
SHARD_USER = "celeba"
SHARD_MODE = 0o444
_TAR_BLOCK, _TAR_RECORD = 512, 10240
TEMP_SUFFIX = ".tmp"  # an unfinished shard is <name>.tmp: a resumed run knows its own by this name


def shard_temp(path: Path) -> Path:
    """The name shard ``path`` is written under until it is complete."""
    return path.with_name(path.name + TEMP_SUFFIX)


def tar_bytes(member_bytes: int) -> int:
    """Size of a finished tar whose members take ``member_bytes`` (headers and padding included)."""
    return math.ceil((member_bytes + 2 * _TAR_BLOCK) / _TAR_RECORD) * _TAR_RECORD


def sample_member_bytes(sample: dict[str, Any]) -> int:
    """Bytes the members of ``sample`` take in a tar: a header block each, data padded to whole blocks."""
    return sum(_TAR_BLOCK + math.ceil(len(v) / _TAR_BLOCK) * _TAR_BLOCK for k, v in sample.items() if k != "__key__")


class ShardWriter:
    """Streams samples into one shard under ``<name>.tmp``; :meth:`close` fsyncs and renames it.

    ``start``: the plan position of the shard's first image; ``skipped``: the images of its range
    left out as bad, recorded with it.
    """

    def __init__(self, out_dir: Path, split: str, index: int, *, start: int, skipped: list[dict[str, str]]):
        from webdataset import TarWriter  # imported here: webdataset imports torch, verify needs neither

        self.start, self.skipped = start, skipped
        self.file = shard_file(split, index)
        self.path = out_dir / self.file
        self.tmp = shard_temp(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = open(self.tmp, "wb")
        self._tar = TarWriter(self._stream, user=SHARD_USER, group=SHARD_USER, mode=SHARD_MODE,
                              mtime=SHARD_MTIME, encoder=False)
        self.num_samples = 0
        self.member_bytes = 0
        self.converted: dict[str, list[str]] = defaultdict(list)
        self.sizes: set[tuple[int, int]] = set()

    def full(self, member_bytes: int, *, max_samples: int | None, max_bytes: int | None) -> bool:
        """Would one more sample of ``member_bytes`` overflow the shard? (An empty shard takes anything.)

        The limit is ``max_samples`` when given, else ``max_bytes`` of finished tar.
        """
        if self.num_samples == 0:
            return False
        if max_samples is not None:
            return self.num_samples >= max_samples
        return tar_bytes(self.member_bytes + member_bytes) > (max_bytes or 0)

    def add(self, sample: dict[str, Any], member_bytes: int, *, size: tuple[int, int] | None,
            converted: str | None) -> None:
        """Append ``sample``; ``size`` of its image and why it was ``converted`` go into the record."""
        with translate_disk_full(self.path):
            self._tar.write(sample)
        self.num_samples += 1
        self.member_bytes += member_bytes
        if converted:
            self.converted[converted].append(sample["__key__"])
        if size:
            self.sizes.add(size)

    def close(self, stop: int) -> dict[str, Any]:
        """Finish the shard: close the tar, fsync, rename; return its progress entry."""
        with translate_disk_full(self.path):
            self._tar.close()
            self._stream.flush()
            os.fsync(self._stream.fileno())
            self._stream.close()
            os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return {"file": self.file, "num_samples": self.num_samples, "bytes": self.path.stat().st_size,
                "sha256": file_sha256(self.path), "start": self.start, "stop": stop,
                "converted": {k: v for k, v in sorted(self.converted.items())}, "skipped": self.skipped,
                "sizes": sorted([list(s) for s in self.sizes])}

    def abort(self) -> None:
        """Drop the unfinished shard: no half-written file is left behind."""
        try:
            self._tar.close()  # closes tarfile's buffer, which would otherwise flush into a closed file later
            self._stream.close()
        except OSError:  # the error that brought us here (a full disk) may strike again: it is reported already
            pass
        finally:
            self.tmp.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the split's folder, when this was to be its first shard
                self.path.parent.rmdir()
