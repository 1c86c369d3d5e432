"""Resuming a pack: ``OUT_DIR/.pack-progress.json`` records the plan and every completed shard.

A re-run of the same plan keeps the recorded shards whose sha256 checks out and writes only what
is missing (:func:`plan_segments`); shards of another source, of other options or of no record
are refused (:func:`open_out_dir`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from celeba_dist import runlock
from celeba_dist.diskio import unfinished_writes, write_json
from celeba_dist.pack.options import PackError, PackOptions
from celeba_dist.pack.plan import Plan
from celeba_dist.pack.sources import SourceData
from celeba_dist.pack.writer import shard_temp
from celeba_dist.shards.layout import SPLITS, shard_file
from celeba_dist.shards.manifest import MANIFEST_NAME, file_sha256

log = logging.getLogger(__name__)

PROGRESS_NAME = ".pack-progress.json"
_START_AFRESH = "pack into an empty folder or delete this one"


@dataclass(frozen=True)
class Segment:
    """Plan positions ``[start, stop)`` of a split to write, from shard ``first_index`` on.

    ``rebuild``: exactly one shard (a lost or damaged one, rewritten with its recorded range).
    """

    split: str
    start: int
    stop: int
    first_index: int
    rebuild: bool = False


@dataclass
class Progress:
    """``OUT_DIR/.pack-progress.json``: the plan and every completed shard, rewritten after each one."""

    path: Path
    header: dict[str, Any]
    shards: dict[str, dict[int, dict[str, Any]]] = field(default_factory=lambda: {s: {} for s in SPLITS})

    def record(self, split: str, index: int, entry: dict[str, Any]) -> None:
        """Note shard ``index`` of ``split`` as complete, on disk at once."""
        self.shards[split][index] = entry
        self.save()

    def save(self) -> None:
        """Write the record atomically."""
        body = {s: [self.shards[s][i] for i in sorted(self.shards[s])] for s in SPLITS}
        write_json(self.path, {**self.header, "splits": body}, indent=1)

    def entries(self, split: str) -> list[dict[str, Any]]:
        """The recorded shards of ``split``, in order."""
        return [self.shards[split][i] for i in sorted(self.shards[split])]


def open_out_dir(out_dir: Path, data: SourceData, options: PackOptions, plan_fp: str) -> Progress:
    """Check ``out_dir`` holds nothing foreign, clear stale temporaries, load what a previous run completed."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PackError(f"{out_dir} exists and is not a folder")
    header = {"format": "celeba-dist-pack-progress", "version": 1,
              "source": {"kind": data.kind, "path": data.path, "fingerprint": data.fingerprint},
              "plan": plan_fp, "options": options.content()}
    progress = Progress(out_dir / PROGRESS_NAME, header)
    old_manifest = _read_json(out_dir / MANIFEST_NAME)
    old_progress = _read_json(progress.path)
    _refuse_other_source(out_dir, data, {MANIFEST_NAME: old_manifest, PROGRESS_NAME: old_progress})
    if old_progress is not None:
        _refuse_other_plan(out_dir, options, old_progress, plan_fp)
        for split in SPLITS:
            for i, entry in enumerate(old_progress.get("splits", {}).get(split, [])):
                progress.shards[split][i] = entry
    _refuse_unrecorded_shards(out_dir, progress)
    _clear_temporaries(out_dir)  # last: a refused folder is left exactly as it was
    return progress


def create_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` before writing and drop its manifest, which only ever describes finished shards.

    A path that cannot be a folder (a file in the way, no permission, a read-only file system) is a
    :class:`PackError` naming it, not a traceback.
    """
    with _named_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)


@contextlib.contextmanager
def _named_errors(out_dir: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if e.filename and Path(e.filename) != out_dir else ""
        raise PackError(f"cannot create the output folder {out_dir}: {e.strerror or e}{where}") from None


@contextlib.contextmanager
def locked_out_dir(out_dir: Path) -> Iterator[None]:
    """One pack per output folder: ``out_dir`` is held for the block with the run lock (:mod:`celeba_dist.runlock`).

    A folder another live pack holds is a :class:`PackError` naming that pack, with nothing changed; a folder
    this pack created and left empty (it failed before its first shard) is removed again.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise PackError(f"{out_dir} exists and is not a folder")
    created = not out_dir.exists()
    with _named_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = runlock.acquire(out_dir, stale_s=runlock.OUTPUT_LOCK_STALE_S, user=runlock.PACK)
        except runlock.RunLockedError as e:
            raise PackError(str(e)) from None
    try:
        yield
    finally:
        lock.release()
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only when empty
    if lock.lost.is_set():
        raise PackError(f"another pack took the lock of {out_dir} over during this one: their shards may be mixed; "
                        f"check with `celeba-dist verify {out_dir}`")


def _refuse_other_source(out_dir: Path, data: SourceData, records: dict[str, dict[str, Any] | None]) -> None:
    for what, old in records.items():
        old_source = old.get("source") if old is not None and isinstance(old.get("source"), dict) else {}
        if old is not None and old_source.get("fingerprint") != data.fingerprint:
            raise PackError(f"{out_dir} already holds shards from a different source, or from this one before "
                            f"its labels changed ({what}: {old_source.get('kind')} {old_source.get('path')}); "
                            f"{_START_AFRESH}")


def _refuse_other_plan(out_dir: Path, options: PackOptions, old_progress: dict[str, Any], plan_fp: str) -> None:
    if old_progress.get("plan") == plan_fp:
        return
    old_options, new_options = old_progress.get("options", {}), options.content()
    changed = {k: [old_options.get(k), new_options.get(k)] for k in sorted(set(old_options) | set(new_options))
               if old_options.get(k) != new_options.get(k)}  # the union: content() leaves out an unset --resplit
    raise PackError(f"{out_dir} holds shards of this source packed with other options or another image "
                    f"selection (changed [old, new]: {changed or 'the selected images'}); {_START_AFRESH}")


def _refuse_unrecorded_shards(out_dir: Path, progress: Progress) -> None:
    known = {e["file"] for s in SPLITS for e in progress.entries(s)}
    foreign = sorted(str(p.relative_to(out_dir)) for s in SPLITS for p in (out_dir / s).glob("*.tar")
                     if str(p.relative_to(out_dir)) not in known)
    if foreign:
        raise PackError(f"{out_dir} holds shards that no pack progress record describes ({foreign[:3]}...); "
                        f"{_START_AFRESH}")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PackError(f"{path}: unreadable ({e}); {_START_AFRESH}") from None
    if not isinstance(value, dict):
        raise PackError(f"{path}: not a JSON object; {_START_AFRESH}")
    return value


def _clear_temporaries(out_dir: Path) -> None:
    """Remove what a killed pack left under temporary names, and only that: other ``*.tmp`` files are the user's."""
    for tmp in _own_temporaries(out_dir):
        log.info("removing %s, left by an interrupted run", tmp)
        tmp.unlink()


def _own_temporaries(out_dir: Path) -> list[Path]:
    """Unfinished shards (:func:`~celeba_dist.pack.writer.shard_temp` of a shard name) and unfinished
    writes of the progress record or the manifest (:func:`~celeba_dist.diskio.temp_name`)."""
    found = unfinished_writes(out_dir, of=lambda name: name in (PROGRESS_NAME, MANIFEST_NAME))
    for split in SPLITS:
        for path in _files(out_dir / split):
            index = re.search(r"(\d+)\D*$", path.name)
            if index and path == shard_temp(out_dir / shard_file(split, int(index.group(1)))):
                found.append(path)
    return found


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def plan_segments(plan: Plan, progress: Progress, out_dir: Path) -> list[Segment]:
    """What is left to write: recorded shards that are lost or damaged, then each split's tail."""
    segments: list[Segment] = []
    for split in SPLITS:
        entries = progress.entries(split)
        for index, entry in enumerate(entries):
            if not shard_intact(out_dir, entry):
                log.warning("%s is missing or damaged; rewriting it", entry["file"])
                segments.append(Segment(split, entry["start"], entry["stop"], index, rebuild=True))
        start = entries[-1]["stop"] if entries else 0
        if start < len(plan.rows[split]):
            segments.append(Segment(split, start, len(plan.rows[split]), len(entries)))
    return segments


def shard_intact(out_dir: Path, entry: dict[str, Any]) -> bool:
    """Is the recorded shard ``entry`` on disk with its recorded size and sha256?"""
    path = out_dir / entry["file"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and file_sha256(path) == entry["sha256"]
