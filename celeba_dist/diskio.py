"""Writes that are all or nothing, and full disks that say so: the one place that renames files.

Every file a run or a pack leaves behind (checkpoints, metrics, configs, manifests, predictions,
job records) is written through :func:`atomic_write`: to a temporary name in the same folder,
flushed and fsynced, then renamed over the target, and the folder fsynced. A kill at any moment
leaves the old file or the new one under the target's name, never a part; a failed write leaves
no temporary file behind.

A write that fails because the file system is full (``ENOSPC``/``EDQUOT``, also when it surfaces
as another library's error, e.g. ``torch.save``'s "unexpected pos") raises :class:`DiskFullError`,
which names the file. Standard library only: the packer and the shard contract use it too.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(OSError):
    """No space (or quota) left while writing ``path``; ``str()`` says so and names the file."""

    def __init__(self, path: str | os.PathLike[str], detail: str = ""):
        self.path = Path(path)
        free = _free_bytes(self.path.parent)
        where = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
        text = f"no space left on device writing {self.path} ({where})"
        super().__init__(errno.ENOSPC, text + (f"; {detail}" if detail else ""))

    def __str__(self) -> str:
        return self.strerror

    def with_detail(self, detail: str) -> "DiskFullError":
        """The same error with ``detail`` added (e.g. which checkpoint is still the newest)."""
        return DiskFullError(self.path, detail)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it was raised from is an out-of-space error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in NO_SPACE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def translate_disk_full(path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise an out-of-space error inside the block as :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFullError(path) from exc
        raise


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """The temporary name a write of ``path`` goes through: hidden, per process, ending in ``.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


_TEMP_NAME = re.compile(r"\.(.+)\.\d+\.tmp")  # temp_name's: the file's name comes back as group 1


def unfinished_writes(folder: Path, *, of: Callable[[str], object]) -> list[Path]:
    """The :func:`temp_name` files in ``folder`` of writes that never finished (their process was killed),
    for the file names ``of`` accepts; other ``*.tmp`` files (the user's) are never listed."""
    if not folder.is_dir():
        return []
    found = ((entry, _TEMP_NAME.fullmatch(entry.name)) for entry in os.scandir(folder))
    return sorted(Path(entry.path) for entry, match in found if match and entry.is_file() and of(match[1]))


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first: what creating it makes."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first, as :func:`missing_folders` lists them) while they are empty: what a
    refused or failed command made and left nothing in."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): it and the folders above stay
            return


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", *, newline: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it replaces ``path`` (fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    text = "b" not in mode
    try:
        with translate_disk_full(path):
            with open(tmp, mode, encoding="utf-8" if text else None, newline=newline if text else None) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def copy_file(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Copy ``source`` to ``path`` atomically."""
    with atomic_write(path, "wb") as out, open(source, "rb") as src:
        shutil.copyfileobj(src, out, 2**20)


def link_or_copy(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Point ``path`` at ``source``'s content atomically: a hard link, or a copy where links fail."""
    path = Path(path)
    tmp = temp_name(path)
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        copy_file(source, path)
        return
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary sibling folder to fill; on a clean exit it becomes ``path`` (which must not exist, or
    be empty), on an error it is removed: a reader never sees half a folder."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty folder: choose a new one, or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with translate_disk_full(tmp):
            yield tmp
            if path.exists():
                path.rmdir()
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
