"""Reading WebDataset samples out of a tar shard, fast.

webdataset's own reader goes through Python's streaming ``tarfile``, about 100 µs per member on
our machines; a CelebA sample has five members (jpg, attr.json, identity.txt, bbox.json,
landmarks.json), so that alone cost more than decoding the image at the size a 64×64 model needs.
This reader maps the file and walks the 512-byte headers directly (POSIX ustar, with GNU long
names and pax ``path`` records), about 10× faster. It groups members into samples exactly as
webdataset does (``dir/000001.attr.json`` → key ``dir/000001``, field ``attr.json``), and the tests
check it against ``webdataset.WebDataset`` on real shards.
"""
from __future__ import annotations

import contextlib
import mmap
import struct
from typing import Iterator

from celeba_dist.shards.layout import group_members, split_key

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
GNU_LONGNAME = b"L"
PAX_HEADERS = (b"x", b"g")


class TarFormatError(ValueError):
    """The shard is not a tar file this reader understands (names the file and offset)."""


def _octal(field: bytes, path: str, pos: int) -> int:
    if field[11] == 0:  # the common "%011o\0"; anything else takes the general path
        try:
            return int(field[:11], 8)
        except ValueError:
            pass
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    if field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    try:
        return int(text, 8)
    except ValueError as exc:
        raise TarFormatError(f"{path} at byte {pos}: bad number {field!r} in a tar header") from exc


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header, if any ("LEN path=VALUE\\n" records)."""
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1: pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


@contextlib.contextmanager
def _mapped(path: str) -> Iterator[mmap.mmap | None]:
    with open(path, "rb") as fh:
        if fh.seek(0, 2) == 0:
            yield None
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            yield buf


# name, size, type flag, ustar magic, prefix: the fields of a 512-byte header this reader needs
_HEADER = struct.Struct("100s24x12s20xc100x5s83x155s")


def _walk(buf: mmap.mmap, path: str) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file; each header is unpacked in one call, data never read."""
    pos, end, long_name = 0, len(buf), None
    unpack = _HEADER.unpack_from
    while pos + BLOCK <= end:
        raw_name, size_field, kind, magic, prefix = unpack(buf, pos)
        if not raw_name[0] and buf[pos: pos + BLOCK].count(0) == BLOCK:  # end-of-archive marker
            return
        size = _octal(size_field, path, pos)
        header, data_start = pos, pos + BLOCK
        pos = data_start + (size + BLOCK - 1) // BLOCK * BLOCK
        if pos > end:
            raise TarFormatError(f"{path} at byte {header}: truncated tar member ({size} bytes past the end of the file)")
        if kind == GNU_LONGNAME:
            long_name = buf[data_start: data_start + size].split(b"\0", 1)[0].decode("utf-8")
            continue
        if kind in PAX_HEADERS:
            long_name = _pax_path(buf[data_start: data_start + size]) or long_name
            continue
        name = long_name or _header_name(raw_name, magic, prefix)
        long_name = None
        if kind in REGULAR:
            yield name, data_start, size


def _header_name(raw_name: bytes, magic: bytes, prefix: bytes) -> str:
    name = raw_name.split(b"\0", 1)[0].decode("utf-8")
    if magic == b"ustar" and prefix[0]:
        name = prefix.split(b"\0", 1)[0].decode("utf-8") + "/" + name
    return name


def iter_samples(path: str, fields: frozenset[str] | None = None) -> Iterator[dict]:
    """webdataset-style samples: {"__key__", "__url__", field: bytes, ...}, consecutive members grouped.

    ``fields``: only these members' bytes are read (the others are skipped in the file, not copied).
    """
    with _mapped(path) as buf:
        if buf is None:
            return
        yield from group_members(_named_errors(_walk(buf, path)), path, fields,
                                 read=lambda span: buf[span[0]: span[0] + span[1]])


def _named_errors(members: Iterator[tuple[str, int, int]]) -> Iterator[tuple[str, tuple[int, int]]]:
    """(name, (offset, size)) of each member; a damaged header's error names the last sample read, as the
    damage lies past it."""
    key = None
    try:
        for name, start, size in members:
            key = name
            yield name, (start, size)
    except TarFormatError as exc:
        after = f" (after sample {split_key(key)[0]})" if key else " (before its first sample)"
        raise TarFormatError(f"{exc}{after}") from exc
