"""A tiny CelebA in the official format, for tests that must not depend on the synthetic generator.

The files follow the release byte for byte in form: a count line, the header with its trailing
space, ``%2d`` values joined by one space (so runs of spaces), CRLF line ends (LF on request).
"""
from __future__ import annotations

import glob
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from celeba_dist.attributes import CELEBA_ATTRIBUTES

BBOX_FIELDS = ("x_1", "y_1", "width", "height")
LANDMARK_FIELDS = ("lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
                   "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y")


@dataclass
class TinyCeleba:
    """What was written: ``source`` is the path to pack, ``folder`` the one holding the files."""

    source: Path
    folder: Path
    names: list[str]  # "000001.jpg", ...
    labels: np.ndarray  # (N, A) in {-1, 1}
    partition: list[int]  # 0 train, 1 val, 2 test
    identity: list[int]
    bbox: np.ndarray  # (N, 4)
    landmarks: np.ndarray  # (N, 10)
    attributes: tuple[str, ...]

    @property
    def ids(self) -> list[str]:
        return [n.split(".")[0] for n in self.names]

    def file(self, name: str) -> Path:
        return self.folder / name

    def image_path(self, index: int) -> Path:
        return self.folder / "img_align_celeba" / self.names[index]


def tiny_image(index: int, size: tuple[int, int] = (178, 218), *, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A small deterministic picture (a coloured face-ish box on a background), encoded as ``fmt``."""
    rng = np.random.default_rng(index)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    image = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse([w // 5, h // 6, 4 * w // 5, 5 * h // 6], fill=tuple(255 - c for c in colour))
    draw.rectangle([w // 3, h // 2, 2 * w // 3, h // 2 + h // 10], fill=(index * 37 % 256, 40, 90))
    if mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def write_celeba(
    root: Path,
    *,
    num_images: int = 30,
    seed: int = 0,
    layout: str = "official",
    partition: bool = True,
    extras: bool = True,
    zip_images: bool = False,
    crlf: bool = True,
    size: tuple[int, int] = (178, 218),
    attributes: tuple[str, ...] = CELEBA_ATTRIBUTES,
    fractions: tuple[float, float] = (0.7, 0.85),
) -> TinyCeleba:
    """Write a CelebA folder (``official``: files in ``root``; ``torchvision``: in ``root/celeba``)."""
    folder = root / "celeba" if layout == "torchvision" else root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = num_images
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    labels = np.where(rng.random((n, len(attributes))) < 0.4, 1, -1)
    parts = [0 if i < fractions[0] * n else 1 if i < fractions[1] * n else 2 for i in range(n)]
    identity = rng.integers(1, 10_000, n).tolist()
    bbox = rng.integers(10, 400, (n, 4))
    landmarks = rng.integers(60, 160, (n, 10))
    eol = "\r\n" if crlf else "\n"

    def write(name: str, lines: list[str]) -> None:
        (folder / name).write_bytes("".join(line + eol for line in lines).encode())

    write("list_attr_celeba.txt", [str(n), " ".join(attributes) + " "]
          + [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, labels)])
    if partition:
        write("list_eval_partition.txt", [f"{name} {p}" for name, p in zip(names, parts)])
    if extras:
        write("identity_CelebA.txt", [f"{name} {i}" for name, i in zip(names, identity)])
        write("list_bbox_celeba.txt", [str(n), "image_id " + " ".join(BBOX_FIELDS)]
              + [f"{name}" + "".join(f"{v:>6d}" for v in row) for name, row in zip(names, bbox)])
        write("list_landmarks_align_celeba.txt", [str(n), " ".join(LANDMARK_FIELDS) + " "]
              + [f"{name} " + "".join(f"{v:>5d}" for v in row) for name, row in zip(names, landmarks)])
    images = {name: tiny_image(i, size) for i, name in enumerate(names)}
    if zip_images:
        with zipfile.ZipFile(folder / "img_align_celeba.zip", "w") as z:
            for name, data in images.items():
                z.writestr(f"img_align_celeba/{name}", data)
    else:
        (folder / "img_align_celeba").mkdir(exist_ok=True)
        for name, data in images.items():
            (folder / "img_align_celeba" / name).write_bytes(data)
    return TinyCeleba(root, folder, names, labels, parts, identity, bbox, landmarks, attributes)


def replace_line(path: Path, line: int, text: str) -> None:
    """Replace 1-based ``line`` of ``path``, keeping its line ends."""
    raw = path.read_bytes().decode()
    eol = "\r\n" if "\r\n" in raw else "\n"
    lines = raw.split(eol)
    lines[line - 1] = text
    path.write_bytes(eol.join(lines).encode())


def append_line(path: Path, text: str) -> None:
    raw = path.read_bytes().decode()
    eol = "\r\n" if "\r\n" in raw else "\n"
    path.write_bytes((raw + text + eol).encode())


def read_split(out_dir: Path, split: str) -> list[dict]:
    """Every sample of a split, read with plain WebDataset from the shard files (not the manifest)."""
    urls = sorted(glob.glob(str(out_dir / split / "*.tar")))
    if not urls:
        return []
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def decoded(sample: dict) -> dict:
    """The sample's labels and extras as Python values."""
    out = {"key": sample["__key__"], "attr": json.loads(sample["attr.json"])}
    if "identity.txt" in sample:
        out["identity"] = int(sample["identity.txt"])
    for name in ("bbox", "landmarks"):
        if f"{name}.json" in sample:
            out[name] = json.loads(sample[f"{name}.json"])
    return out


def tree_state(folder: Path) -> dict[str, tuple[int, int, int]]:
    """``relative path -> (inode, mtime_ns, size)`` of every file under ``folder``."""
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            st = os.stat(path)
            state[str(path.relative_to(folder))] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return state


@dataclass
class TinyHF:
    """A ``datasets`` CelebA written with ``save_to_disk``; per split: image bytes, celeb_id, 0/1 labels."""

    path: Path
    images: dict[str, list[bytes]]
    identity: dict[str, list[int]]
    labels: dict[str, np.ndarray]  # split -> (n, 40) 0/1


def write_hf_celeba(
    path: Path,
    counts: dict[str, int],
    *,
    seed: int = 0,
    size: tuple[int, int] = (32, 40),
    encoding: str = "bool",
    png_rows: tuple[int, ...] = (),
    columns: dict[str, list] | None = None,
) -> TinyHF:
    """The hub's common schema (``image``, ``celeb_id``, the 40 attributes as bool) as a DatasetDict.

    ``encoding``: ``bool``, ``01`` or ``pm1`` attribute columns; ``png_rows``: rows (counted over the
    splits in order) stored as PNG instead of JPEG; ``columns``: extra columns, values over all rows.
    """
    import datasets

    datasets.disable_progress_bars()
    rng = np.random.default_rng(seed)
    images, identity, labels, parts, start = {}, {}, {}, {}, 0
    for split, n in counts.items():
        rows = range(start, start + n)
        images[split] = [tiny_image(i, size, fmt="PNG" if i in png_rows else "JPEG") for i in rows]
        identity[split] = rng.integers(1, 10_000, n).tolist()
        labels[split] = (rng.random((n, 40)) < 0.4).astype(np.uint8)
        value = {"bool": lambda v: bool(v), "01": lambda v: int(v), "pm1": lambda v: 1 if v else -1}[encoding]
        dtype = {"bool": "bool", "01": "int64", "pm1": "int64"}[encoding]
        table = {"image": [{"bytes": b, "path": None} for b in images[split]], "celeb_id": identity[split]}
        table.update({a: [value(v) for v in labels[split][:, j]] for j, a in enumerate(CELEBA_ATTRIBUTES)})
        features = {"image": datasets.Image(), "celeb_id": datasets.Value("int64"),
                    **{a: datasets.Value(dtype) for a in CELEBA_ATTRIBUTES}}
        for name, values in (columns or {}).items():
            table[name] = values[start:start + n]
            features[name] = datasets.Value("string") if isinstance(values[0], str) else datasets.Image()
        parts[split] = datasets.Dataset.from_dict(table, features=datasets.Features(features))
        start += n
    datasets.DatasetDict(parts).save_to_disk(str(path))
    return TinyHF(path, images, identity, labels)
