"""Readers of the three CelebA source kinds, validated in full before anything is written.

* ``official``: the release folder — ``list_attr_celeba.txt``, ``list_eval_partition.txt`` (optional:
  without it the packer generates a split), ``img_align_celeba/`` or ``img_align_celeba.zip`` (read
  in place), and optionally ``identity_CelebA.txt``, ``list_bbox_celeba.txt``,
  ``list_landmarks_align_celeba.txt``. CRLF and LF line ends are both accepted.
* ``torchvision``: the same files under ``ROOT/celeba/`` (``torchvision.datasets.CelebA(root=ROOT)``).
* ``hf``: a Hugging Face ``datasets`` dataset — a ``save_to_disk`` folder, local parquet/arrow files
  or a hub name — with an image column and the attribute columns (bool, 0/1 or -1/1).

Every reader returns a :class:`SourceData`: columnar labels plus an :class:`ImageStore` that worker
processes use to fetch image bytes. Problems with single rows or images (a bad value, a missing
image, …) are collected and raised together as one :class:`SourceError` naming file and line
(1-based) or split and row; with ``skip_bad`` they are dropped and listed instead. Problems with a
whole file (a wrong header, a count line that does not match) are always errors.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from celeba_dist.attributes import CELEBA_ATTRIBUTES
from celeba_dist.shards.layout import IMAGE_SUFFIXES, SPLITS

log = logging.getLogger(__name__)

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IDENTITY_FILE = "identity_CelebA.txt"
BBOX_FILE = "list_bbox_celeba.txt"
LANDMARKS_FILE = "list_landmarks_align_celeba.txt"
IMAGE_DIR = "img_align_celeba"
IMAGE_ZIP = "img_align_celeba.zip"
HF_SPLIT_ALIASES = {"train": "train", "valid": "val", "validation": "val", "val": "val", "dev": "val", "test": "test"}
HF_ID_COLUMNS = ("image_id", "id", "filename", "file_name", "image_name", "img_id", "file")
HF_IDENTITY_COLUMNS = ("celeb_id", "identity", "identity_id", "person_id")
_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_INT_PATTERN = re.compile(r"[+-]?\d+")
_MAX_LISTED = 20  # problems listed in one error message


class SourceError(ValueError):
    """A source is missing, malformed or ambiguous; the message names the file and line or image."""


# -- images -------------------------------------------------------------------------------------

class ImageStore(Protocol):
    """Fetches the bytes of one image; picklable, so worker processes can hold one."""

    def read(self, locator: Any) -> bytes: ...

    def describe(self, locator: Any) -> str: ...


@dataclass
class FolderImages:
    """Images as files in a folder; locators are file names."""

    folder: str

    def read(self, locator: str) -> bytes:
        with open(os.path.join(self.folder, locator), "rb") as f:
            return f.read()

    def describe(self, locator: str) -> str:
        return os.path.join(self.folder, locator)


@dataclass
class ZipImages:
    """Images inside a zip archive, read in place; locators are member names.

    Each process opens its own handle: a ``ZipFile`` shared across ``fork`` would share the file offset.
    """

    path: str
    _handle: zipfile.ZipFile | None = field(default=None, repr=False, compare=False)
    _pid: int = field(default=-1, repr=False, compare=False)

    def read(self, locator: str) -> bytes:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._handle.read(locator)

    def describe(self, locator: str) -> str:
        return f"{self.path}:{locator}"

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_handle": None, "_pid": -1}


@dataclass
class HFImages:
    """Images in a column of ``datasets`` splits; locators are ``(split name, row)``."""

    parts: dict[str, Any]  # split name -> datasets.Dataset holding only the image column, undecoded
    column: str
    label: str

    def read(self, locator: tuple[str, int]) -> bytes:
        part, row = locator
        value = self.parts[part][int(row)][self.column]
        if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                return value["bytes"]
            if value.get("path"):
                with open(value["path"], "rb") as f:
                    return f.read()
            raise FileNotFoundError("the image cell is empty")
        if value is None:
            raise FileNotFoundError("the image cell is empty")
        return bytes(value)

    def describe(self, locator: tuple[str, int]) -> str:
        return f"{self.label} split {locator[0]!r} row {locator[1]}"


# -- the common result --------------------------------------------------------------------------

@dataclass(frozen=True)
class Extra:
    """An optional per-image annotation: ``values`` (N,) when ``fields`` is None, else (N, len(fields))."""

    fields: tuple[str, ...] | None
    values: np.ndarray


@dataclass
class SourceData:
    """Everything read from a source, one row per usable image (bad ones already dropped)."""

    kind: str  # "official" | "torchvision" | "hf"
    path: str
    fingerprint: str  # sha256 over the label files (or label columns): what resuming compares
    attribute_names: list[str]  # the columns of `labels`
    ids: list[str]  # image ids without extension, unique
    labels: np.ndarray  # (N, A) uint8, 0/1
    splits: np.ndarray | None  # (N,) int8 index into SPLITS; None: the source has no partition
    locators: list[Any]  # per image, for `images.read`
    images: ImageStore
    extras: dict[str, Extra] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"id", "reason", "split": str | None}

    def __len__(self) -> int:
        return len(self.ids)


def open_source(
    spec: str,
    *,
    attributes: list[str] | None = None,
    skip_bad: bool = False,
    image_column: str | None = None,
    id_column: str | None = None,
    identity_column: str | None = None,
) -> SourceData:
    """Read ``spec`` (a CelebA folder or ``hf:PATH_OR_NAME``) in full and validate it.

    ``attributes`` are the attribute names that must be present (all 40 when None).
    """
    if spec.startswith("hf:"):
        return read_hf(spec[3:], attributes=attributes, skip_bad=skip_bad, image_column=image_column,
                       id_column=id_column, identity_column=identity_column)
    hf_only = {"--image-column": image_column, "--id-column": id_column, "--identity-column": identity_column}
    given = [name for name, value in hf_only.items() if value is not None]
    if given:
        raise SourceError(f"{given} only apply to hf: sources, not to the folder {spec}")
    root, kind = find_celeba_folder(Path(spec))
    return read_official(root, kind=kind, attributes=attributes, skip_bad=skip_bad)


def find_celeba_folder(path: Path) -> tuple[Path, str]:
    """The folder holding the label files, and the layout: ``official`` or ``torchvision``."""
    if not path.is_dir():
        raise SourceError(f"{path}: no such folder (SOURCE is a CelebA folder or hf:PATH_OR_NAME)")
    if (path / ATTR_FILE).is_file():
        return path, "official"
    if (path / "celeba" / ATTR_FILE).is_file():
        return path / "celeba", "torchvision"
    raise SourceError(f"{path}: not a CelebA folder: no {ATTR_FILE} in it, "
                      f"nor in {path / 'celeba'} (torchvision layout)")


# -- problems -----------------------------------------------------------------------------------

class _Problems:
    """Row-level problems: errors to report together, or with ``skip_bad`` rows to drop.

    A row is known by a key (the file name, or the row number of an hf: source) and an image id.
    """

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.errors: list[str] = []
        self.skipped: dict[Any, tuple[str, str]] = {}  # key -> (id, reason)

    def row(self, key: Any, image_id: str, message: str) -> None:
        if self.skip_bad:
            self.skipped.setdefault(key, (image_id, message))
        else:
            self.errors.append(message)

    def note(self, message: str) -> None:
        """A problem with nothing to skip (e.g. a repeated row, or a row for an unlabelled image)."""
        if self.skip_bad:
            log.warning("ignored: %s", message)
        else:
            self.errors.append(message)

    def raise_if_any(self, what: str) -> None:
        if not self.errors:
            return
        shown = self.errors[:_MAX_LISTED]
        more = f"\n  ... and {len(self.errors) - len(shown)} more" if len(self.errors) > len(shown) else ""
        raise SourceError(f"{what}: {len(self.errors)} problem(s) (pass --skip-bad to skip bad items instead):\n  "
                          + "\n  ".join(shown) + more)


# -- official / torchvision folders -------------------------------------------------------------

@dataclass
class _Table:
    """A parsed label file: value names and, per image file name, its line and values (None: bad row)."""

    file: str
    fields: list[str]
    rows: dict[str, tuple[int, list[int] | None]] = field(default_factory=dict)

    def values(self, name: str) -> list[int] | None:
        row = self.rows.get(name)
        return None if row is None else row[1]


EXTRA_FILES = {"identity": IDENTITY_FILE, "bbox": BBOX_FILE, "landmarks": LANDMARKS_FILE}


def read_official(root: Path, *, kind: str, attributes: list[str] | None, skip_bad: bool) -> SourceData:
    """Read a CelebA folder in the official layout (``root`` holds the label files)."""
    problems = _Problems(skip_bad)
    labels = _read_attr_file(root / ATTR_FILE, attributes, problems)
    partition = _read_table(root / PARTITION_FILE, problems, counted=False, fields=["partition"])
    extras = {key: _read_table(root / file, problems, counted=key != "identity",
                               fields=["identity"] if key == "identity" else None)
              for key, file in EXTRA_FILES.items()}
    extras = {key: table for key, table in extras.items() if table is not None}
    images, locate = _open_images(root)
    _check_rows(labels, partition, list(extras.values()), images, locate, problems)
    problems.raise_if_any(str(root))

    keep = [n for n, (_, v) in labels.rows.items() if v is not None and n not in problems.skipped]
    if partition is None:
        log.warning("%s: no %s; the packer will generate a split (see --split-ratios, --stratify)",
                    root, PARTITION_FILE)
    return SourceData(
        kind=kind,
        path=str(root.resolve()),
        fingerprint=_fingerprint_files(root, [ATTR_FILE, PARTITION_FILE, *EXTRA_FILES.values()]),
        attribute_names=list(labels.fields),
        ids=[_image_id(n) for n in keep],
        labels=np.array([labels.rows[n][1] for n in keep], dtype=np.uint8).reshape(len(keep), len(labels.fields)),
        splits=None if partition is None else np.array([SPLITS.index(_split_name(partition, n)) for n in keep],
                                                       dtype=np.int8),
        locators=[locate(n) for n in keep],
        images=images,
        extras={key: _extra(table, keep) for key, table in extras.items()},
        skipped=[{"id": i, "reason": r, "split": _split_name(partition, n)} for n, (i, r) in problems.skipped.items()],
    )


def _check_rows(labels: _Table, partition: _Table | None, extras: list[_Table], images: ImageStore,
                locate: Any, problems: _Problems) -> None:
    """Images exist; partition values are 0/1/2; every other file has exactly the labelled images."""
    names = [n for n, (_, v) in labels.rows.items() if v is not None]
    for name in names:
        if locate(name) is None:
            line = labels.rows[name][0]
            problems.row(name, _image_id(name),
                         f"{ATTR_FILE} line {line}: image {name} not found in {images.describe('')}")
    for table in ([partition] if partition is not None else []) + extras:
        for name, (line, _) in table.rows.items():
            if name not in labels.rows:
                problems.note(f"{table.file} line {line}: {name} is not in {ATTR_FILE}")
        for name in names:
            if name not in table.rows:
                problems.row(name, _image_id(name),
                             f"{name} ({ATTR_FILE} line {labels.rows[name][0]}) has no row in {table.file}")
    if partition is not None:
        for name, (line, values) in partition.rows.items():
            if values is not None and values[0] not in (0, 1, 2):
                problems.row(name, _image_id(name), f"{PARTITION_FILE} line {line} ({name}): partition {values[0]} "
                                                    "is not 0 (train), 1 (val) or 2 (test)")


def _split_name(partition: _Table | None, name: str) -> str | None:
    values = partition.values(name) if partition is not None else None
    return SPLITS[values[0]] if values is not None and values[0] in (0, 1, 2) else None


def _extra(table: _Table, names: list[str]) -> Extra:
    if table.fields == ["identity"]:
        return Extra(None, np.array([table.rows[n][1][0] for n in names], dtype=np.int64))
    values = np.array([table.rows[n][1] for n in names], dtype=np.int64).reshape(len(names), len(table.fields))
    return Extra(tuple(table.fields), values)


def _read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """``(1-based line number, tokens)`` of the non-blank lines; CRLF or LF, runs of spaces, and a leading
    UTF-8 byte order mark (Windows Notepad writes one) dropped, so it does not stick to the first token."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not a text file ({e})") from None
    return [(i, line.split()) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _read_count(path: Path, lines: list[tuple[int, list[str]]]) -> int:
    if not lines or len(lines[0][1]) != 1 or not lines[0][1][0].isdigit():
        got = " ".join(lines[0][1]) if lines else "an empty file"
        raise SourceError(f"{path.name} line {lines[0][0] if lines else 1}: expected the number of images, "
                          f"got {got!r:.80}")
    if len(lines) < 2:
        raise SourceError(f"{path.name} line 2: missing the header")
    count, rows = int(lines[0][1][0]), len(lines) - 2
    if count != rows:
        raise SourceError(f"{path.name} line {lines[0][0]}: says {count} images but the file has {rows} rows "
                          "(truncated or edited?)")
    return count


def _read_attr_file(path: Path, attributes: list[str] | None, problems: _Problems) -> _Table:
    """Labels as 0/1 for every header attribute, per image file name, in file order."""
    lines = _read_lines(path)
    _read_count(path, lines)
    header_line, header = lines[1]
    _check_header(path.name, header_line, header, attributes)
    code = {"1": 1, "-1": 0}
    table = _Table(path.name, list(header))
    id_line: dict[str, int] = {}
    for line, tokens in lines[2:]:
        name, values = tokens[0], tokens[1:]
        if name in table.rows:
            problems.note(f"{path.name} line {line}: {name} repeats line {table.rows[name][0]}")
            continue
        table.rows[name] = (line, None)
        first = id_line.setdefault(_image_id(name), line)
        if first != line:
            problems.row(name, _image_id(name), f"{path.name} line {line}: {name} has the id of line {first}")
        elif not _valid_name(name):
            problems.row(name, _image_id(name), f"{path.name} line {line}: {name!r} is not an image file name whose id "
                                                "holds only letters, digits, '_' or '-'")
        elif len(values) != len(header):
            problems.row(name, _image_id(name),
                         f"{path.name} line {line} ({name}): {len(values)} values, expected {len(header)}")
        else:
            try:
                table.rows[name] = (line, [code[v] for v in values])
            except KeyError:
                col = next(j for j, v in enumerate(values) if v not in code)
                problems.row(name, _image_id(name), f"{path.name} line {line} ({name}): value {values[col]!r} for "
                                                    f"{header[col]} (column {col + 2}) is not -1 or 1")
    return table


def _check_header(file: str, line: int, header: list[str], attributes: list[str] | None) -> None:
    """The header must be the 40 CelebA names in order, or hold every name of ``--attributes``."""
    unknown = [h for h in header if h not in CELEBA_ATTRIBUTES]
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if attributes is None:
        if tuple(header) == CELEBA_ATTRIBUTES:
            return
        missing = [a for a in CELEBA_ATTRIBUTES if a not in header]
        detail = "; ".join(s for s in (unknown and f"unknown names {unknown}", missing and f"missing {missing}",
                                       duplicates and f"duplicates {duplicates}") if s) or "not in the official order"
        raise SourceError(f"{file} line {line}: the header is not the 40 CelebA attribute names ({detail}); "
                          "to pack the attributes it has, name them with --attributes")
    missing = [a for a in attributes if a not in header]
    if unknown or duplicates or missing:
        detail = "; ".join(s for s in (unknown and f"unknown names {unknown}",
                                       duplicates and f"duplicates {duplicates}",
                                       missing and f"lacks {missing} named by --attributes") if s)
        raise SourceError(f"{file} line {line}: bad header: {detail}")


def _read_table(path: Path, problems: _Problems, *, counted: bool, fields: list[str] | None) -> _Table | None:
    """A ``name v1 v2 ...`` file of integers (None when absent); ``counted`` files start with a count and a header.

    With ``fields=None`` the value names come from the header (a leading ``image_id`` is dropped).
    """
    if not path.is_file():
        return None
    lines = _read_lines(path)
    if counted:
        _read_count(path, lines)
        header = lines[1][1]
        fields = header[1:] if header and header[0].lower() in ("image_id", "image", "filename") else header
        lines = lines[2:]
    assert fields is not None
    table = _Table(path.name, list(fields))
    for line, tokens in lines:
        name, values = tokens[0], tokens[1:]
        if name in table.rows:
            problems.note(f"{path.name} line {line}: {name} repeats line {table.rows[name][0]}")
            continue
        table.rows[name] = (line, None)
        if len(values) != len(fields):
            problems.row(name, _image_id(name), f"{path.name} line {line} ({name}): {len(values)} values, "
                                                f"expected {len(fields)} ({' '.join(fields)})")
            continue
        ints = _parse_ints(values)
        if ints is None:
            bad = next(v for v in values if not _INT_PATTERN.fullmatch(v))
            problems.row(name, _image_id(name), f"{path.name} line {line} ({name}): value {bad!r} is not an integer")
        else:
            table.rows[name] = (line, ints)
    return table


def _parse_ints(values: list[str]) -> list[int] | None:
    """The values as integers, or None if one is not a plain integer (``int`` alone would take ``1_0``)."""
    try:
        ints = [int(v) for v in values]
    except ValueError:
        return None
    return None if any("_" in v for v in values) else ints


def _open_images(root: Path) -> tuple[ImageStore, Any]:
    """The image store of a CelebA folder and a function: file name -> locator, or None if absent."""
    folder, archive = root / IMAGE_DIR, root / IMAGE_ZIP
    if folder.is_dir():
        present = {entry.name for entry in os.scandir(folder)}
        return FolderImages(str(folder)), (lambda name: name if name in present else None)
    if archive.is_file():
        try:
            with zipfile.ZipFile(archive) as z:
                members = [m for m in z.namelist() if not m.endswith("/")]
        except zipfile.BadZipFile as e:
            raise SourceError(f"{archive}: not a readable zip archive ({e})") from None
        by_name: dict[str, str] = {}
        for member in members:
            by_name.setdefault(member.rsplit("/", 1)[-1], member)
        return ZipImages(str(archive)), by_name.get
    raise SourceError(f"{root}: no images: neither a folder {IMAGE_DIR}/ nor {IMAGE_ZIP}")


def _fingerprint_files(root: Path, names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        path = root / name
        if path.is_file():
            digest.update(f"{name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def _image_id(name: str) -> str:
    """``000001.jpg`` -> ``000001`` (the basename without an image extension)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, suffix = base.rpartition(".")
    return stem if dot and "." + suffix.lower() in IMAGE_SUFFIXES else base


def _valid_name(name: str) -> bool:
    # WebDataset splits a member name at the first dot of its basename, so ids must not hold dots.
    return bool(_ID_PATTERN.fullmatch(_image_id(name)))


# -- Hugging Face datasets ----------------------------------------------------------------------

def read_hf(
    name: str,
    *,
    attributes: list[str] | None,
    skip_bad: bool,
    image_column: str | None = None,
    id_column: str | None = None,
    identity_column: str | None = None,
) -> SourceData:
    """Read a ``datasets`` dataset: splits train, valid/validation/val/dev, test, or a single one."""
    label = f"hf:{name}"
    parts = _load_hf_parts(name, label)
    order = _order_parts(parts, label)
    cols = _pick_hf_columns(parts, order, label, attributes=attributes, image=image_column, image_id=id_column,
                            identity=identity_column)
    raw, ids, identity = _read_hf_columns(parts, order, cols)
    locators = [(p, row) for p in order for row in range(len(parts[p]))]

    problems = _Problems(skip_bad)
    where = [f"{label} split {p!r} row {r}" + (f" (id {i})" if i else "") for (p, r), i in zip(locators, ids)]
    labelled = [c for c in (cols.image_id, cols.identity) if c] + list(cols.attributes.values())
    empty = _report_empty_cells(parts, order, labelled, where, ids, problems)
    _check_hf_ids(ids, where, problems, empty)
    labels = _hf_labels(raw, list(cols.attributes), where, ids, problems, empty)
    for i in _hf_null_rows(parts, order, cols.image):
        problems.row(i, ids[i], f"{where[i]}: the image is missing (empty cell)")
    problems.raise_if_any(label)

    keep = [i for i in range(len(ids)) if i not in problems.skipped]
    split_of = [SPLITS.index(HF_SPLIT_ALIASES[p.lower()]) if len(order) > 1 else -1 for p, _ in locators]
    return SourceData(
        kind="hf",
        path=str(Path(name).resolve()) if Path(name).exists() else name,
        fingerprint=_fingerprint_hf(order, parts, cols.attributes, raw, ids, identity),
        attribute_names=list(cols.attributes),
        ids=[ids[i] for i in keep],
        labels=labels[keep],
        splits=np.array([split_of[i] for i in keep], dtype=np.int8) if len(order) > 1 else None,
        locators=[locators[i] for i in keep],
        images=HFImages({p: _undecoded(parts[p], cols.image) for p in order}, cols.image, label),
        extras={"identity": Extra(None, identity[keep])} if identity is not None else {},
        skipped=[{"id": image_id, "reason": reason, "split": SPLITS[split_of[i]] if split_of[i] >= 0 else None}
                 for i, (image_id, reason) in sorted(problems.skipped.items())],
    )


@dataclass(frozen=True)
class _HFColumns:
    image: str
    attributes: dict[str, str]  # CelebA name -> column
    image_id: str | None
    identity: str | None


def _pick_hf_columns(parts: dict[str, Any], order: list[str], label: str, *, attributes: list[str] | None,
                     image: str | None, image_id: str | None, identity: str | None) -> _HFColumns:
    """Detect the columns (given names win); anything ambiguous is an error naming the option to pass."""
    columns = dict(parts[order[0]].features.items())
    for part in order:
        if list(parts[part].features) != list(columns):
            raise SourceError(f"{label}: split {part!r} has columns {list(parts[part].features)}, "
                              f"unlike {list(columns)}")
    return _HFColumns(
        image=_pick_image_column(columns, image, label),
        attributes=_match_attribute_columns(columns, attributes, label),
        image_id=_pick_named_column(columns, image_id, HF_ID_COLUMNS, "--id-column", label),
        identity=_pick_named_column(columns, identity, HF_IDENTITY_COLUMNS, "--identity-column", label),
    )


def _read_hf_columns(parts: dict[str, Any], order: list[str],
                     cols: _HFColumns) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """The raw attribute values (N, A), the ids and the identities (or None), over the splits in order.

    A null id reads as "" and a null identity as 0 (never NaN cast to an integer): :func:`_report_empty_cells`
    makes their rows bad.
    """
    arrays = {p: parts[p].select_columns(list(cols.attributes.values())).with_format("numpy")[:] for p in order}
    raw = np.concatenate([np.stack([np.asarray(arrays[p][c]) for c in cols.attributes.values()], axis=1)
                          .reshape(-1, len(cols.attributes)) for p in order])
    ids = _hf_ids(_hf_cells(parts, order, cols.image_id) if cols.image_id else None, len(raw))
    identity = None
    if cols.identity:
        identity = np.array([0 if v is None else v for v in _hf_cells(parts, order, cols.identity)], dtype=np.int64)
    return raw, ids, identity


def _hf_cells(parts: dict[str, Any], order: list[str], column: str) -> list[Any]:
    """A column's cells over the splits in order, as Python values: a null is None, an integer stays one
    (numpy would turn an integer column with nulls into floats)."""
    return [v for p in order for v in parts[p].select_columns([column]).with_format("arrow")[:][column].to_pylist()]


def _load_hf_parts(name: str, label: str) -> dict[str, Any]:
    """The dataset's splits by name (a plain Dataset becomes ``{"train": ds}``)."""
    import datasets  # heavy; only hf: sources need it

    path = Path(name)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            builder = {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix)
            if builder is None:
                raise SourceError(f"{label}: a file source must be .parquet or .arrow")
            loaded = datasets.load_dataset(builder, data_files=str(path))
        else:
            loaded = datasets.load_dataset(name)
    except SourceError:
        raise
    except Exception as e:  # datasets raises many kinds; the user needs the message, not the type
        raise SourceError(f"{label}: cannot load the dataset: {type(e).__name__}: {e}") from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded.items())


def _order_parts(parts: dict[str, Any], label: str) -> list[str]:
    """Split names in train, val, test order; one split of any name is kept as the only one."""
    if len(parts) == 1:
        return list(parts)
    unknown = [p for p in parts if p.lower() not in HF_SPLIT_ALIASES]
    if unknown:
        raise SourceError(f"{label}: unknown split name(s) {unknown}; expected train, valid/validation/val/dev, test")
    canon = [HF_SPLIT_ALIASES[p.lower()] for p in parts]
    if len(set(canon)) != len(canon):
        raise SourceError(f"{label}: splits {list(parts)} name the same split twice")
    for missing in sorted(set(SPLITS) - set(canon)):
        log.warning("%s: no %s split; it will be empty", label, missing)
    return sorted(parts, key=lambda p: SPLITS.index(HF_SPLIT_ALIASES[p.lower()]))


def _pick_image_column(columns: dict[str, Any], given: str | None, label: str) -> str:
    import datasets

    if given is not None:
        if given not in columns:
            raise SourceError(f"{label}: --image-column {given!r} is not a column; columns are {list(columns)}")
        return given
    found = [c for c, f in columns.items() if isinstance(f, datasets.Image)]
    if not found:
        found = [c for c, f in columns.items() if getattr(f, "dtype", None) in ("binary", "large_binary")]
    if len(found) != 1:
        what = f"several image columns {found}" if found else "no image column (an Image feature or bytes)"
        raise SourceError(f"{label}: {what}; pass --image-column NAME (columns: {list(columns)})")
    return found[0]


def _match_attribute_columns(columns: dict[str, Any], attributes: list[str] | None, label: str) -> dict[str, str]:
    """CelebA attribute name -> column: exact names first, then case-insensitive (unique) matches."""
    wanted = list(attributes) if attributes is not None else list(CELEBA_ATTRIBUTES)
    found: dict[str, str] = {}
    for name in CELEBA_ATTRIBUTES:
        matches = [name] if name in columns else [c for c in columns if c.lower() == name.lower()]
        if len(matches) > 1:
            raise SourceError(f"{label}: columns {matches} all match attribute {name!r}; "
                              "rename one or pass --attributes")
        if matches:
            found[name] = matches[0]
    missing = [a for a in wanted if a not in found]
    if missing:
        raise SourceError(f"{label}: no column for attribute(s) {missing}; to pack only the attributes it has, "
                          f"pass --attributes NAMES (found {list(found)})")
    for name, column in found.items():
        dtype = getattr(columns[column], "dtype", None)
        if dtype != "bool" and not (dtype or "").startswith(("int", "uint", "float")):
            raise SourceError(f"{label}: column {column!r} has type {dtype or columns[column]}; "
                              "attribute columns must be bool, 0/1 or -1/1 numbers")
    return found


def _pick_named_column(columns: dict[str, Any], given: str | None, names: tuple[str, ...], option: str,
                       label: str) -> str | None:
    if given is not None:
        if given not in columns:
            raise SourceError(f"{label}: {option} {given!r} is not a column; columns are {list(columns)}")
        return given
    found = [c for c in columns if c.lower() in names]
    if len(found) > 1:
        raise SourceError(f"{label}: several candidate columns {found}; pass {option} NAME")
    return found[0] if found else None


def _hf_ids(values: list[Any] | None, n: int) -> list[str]:
    """Ids from the id column's ``values`` (file names lose their extension, numbers become %06d, a null
    becomes "") or, without one, the 1-based row number."""
    if values is None:
        return [f"{i:06d}" for i in range(1, n + 1)]
    return ["" if v is None else f"{v:06d}" if isinstance(v, int) else _image_id(str(v)) for v in values]


def _report_empty_cells(parts: dict[str, Any], order: list[str], columns: list[str], where: list[str],
                        ids: list[str], problems: _Problems) -> set[int]:
    """Report every row with a null cell in ``columns`` (the first such column); return those rows."""
    empty: dict[int, str] = {}
    for column in columns:
        for row in _hf_null_rows(parts, order, column):
            empty.setdefault(row, column)
    for row, column in sorted(empty.items()):
        problems.row(row, ids[row], f"{where[row]}: column {column!r} is empty")
    return set(empty)


def _check_hf_ids(ids: list[str], where: list[str], problems: _Problems, empty: set[int]) -> None:
    """Each id is well formed and unique (rows in ``empty`` are reported already)."""
    first: dict[str, int] = {}
    for i, image_id in enumerate(ids):
        if i in empty:
            continue
        if not _ID_PATTERN.fullmatch(image_id):
            problems.row(i, image_id, f"{where[i]}: the id may only hold letters, digits, '_' or '-'")
        elif image_id in first:
            problems.row(i, image_id, f"{where[i]}: the id repeats {where[first[image_id]]}")
        else:
            first[image_id] = i


def _hf_labels(raw: np.ndarray, names: list[str], where: list[str], ids: list[str], problems: _Problems,
               empty: set[int]) -> np.ndarray:
    """(N, A) 0/1 from bool, 0/1 or -1/1 columns: -1 anywhere means the source encodes -1/1.

    Rows in ``empty`` (a null cell, reported already) are not checked again.
    """
    if raw.dtype == bool:
        return raw.astype(np.uint8)
    values = raw.astype(np.float64)  # a null cell (None or NaN) becomes NaN
    signed = bool((values == -1).any())
    allowed = (-1.0, 1.0) if signed else (0.0, 1.0)
    bad_rows, bad_cols = np.nonzero(~np.isin(values, allowed))
    reported = set(empty)
    for r, c in zip(bad_rows.tolist(), bad_cols.tolist()):
        if r not in reported:
            reported.add(r)
            problems.row(r, ids[r], f"{where[r]}: column {names[c]!r} has value {raw[r, c].item()!r}; "
                                    f"the source encodes attributes as {'-1/1' if signed else '0/1 (or bool)'}")
    return (values > 0).astype(np.uint8)


def _hf_null_rows(parts: dict[str, Any], order: list[str], column: str) -> list[int]:
    """Row numbers (over the splits in order) whose cell in ``column`` is null."""
    empty, offset = [], 0
    for p in order:
        cells = parts[p].select_columns([column]).with_format("arrow")[:][column]
        empty += [offset + i for i in np.nonzero(cells.is_null().to_numpy(zero_copy_only=False))[0].tolist()]
        offset += len(parts[p])
    return empty


def _undecoded(ds: Any, column: str) -> Any:
    import datasets

    ds = ds.select_columns([column])
    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def _fingerprint_hf(order: list[str], parts: dict[str, Any], attr_cols: dict[str, str], raw: np.ndarray,
                    ids: list[str], identity: np.ndarray | None) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"splits": [[p, len(parts[p])] for p in order], "columns": attr_cols}).encode())
    digest.update(np.ascontiguousarray(raw.astype(np.float64)).tobytes())
    digest.update("\n".join(ids).encode())
    if identity is not None:
        digest.update(np.ascontiguousarray(identity).tobytes())
    return digest.hexdigest()
