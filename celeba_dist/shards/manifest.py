"""The shard manifest: its schema, validation, writing and the questions loaders ask of it.

``OUT_DIR/manifest.json`` describes one packing of CelebA into WebDataset shards::

    {"format": "celeba-dist-shards", "format_version": 1, "packer_version": "0.1.0",
     "attributes": ["5_o_Clock_Shadow", ...],            # order of every attr.json list
     "source": {"kind": "official" | "torchvision" | "hf", "path": str, "fingerprint": hex,
                "partition": "source" | "generated" | "resplit",
                "split": {"ratios": [train, val, test], "seed": int, "stratify": [names]}},  # absent for "source"
     "options": {...every packing option used...},
     "image": {"encoding": "jpeg", "resize": null | [W, H], "resample": null | "bicubic",
               "quality": null | Q, "width": int | null, "height": int | null},
     "extras": ["identity", "bbox", "landmarks"],         # the ones the samples carry
     "splits": {"train": {"num_samples": int,
                          "positive_rates": {name: float},
                          "shards": [{"file": "train/celeba-train-000000.tar", "num_samples": int,
                                      "bytes": int, "sha256": hex}],
                          "converted": {"cmyk": [ids], "grayscale": [ids], "png": [ids], ...},
                          "skipped": [{"id": str, "reason": str}]},
                "val": {...}, "test": {...}},
     "skipped": [{"id": str, "reason": str}],             # bad rows dropped before a split was known
     "created": ISO-8601 time}                            # the only field that differs between runs

``partition``: the source's own train/val/test partition (``source``), or one the packer generated
because the source has none (``generated``) or because ``--resplit`` ignored the source's own
(``resplit``); results on a generated split are not comparable with results on CelebA's official
partition. ``quality`` is the JPEG quality of every image the packer re-encoded (null when all
images are the source's bytes); ``width``/``height`` are null when the images do not all share one size.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from celeba_dist.diskio import write_json
from celeba_dist.shards.layout import SPLITS

MANIFEST_NAME = "manifest.json"
FORMAT = "celeba-dist-shards"
FORMAT_VERSION = 1
SOURCE_KINDS: tuple[str, ...] = ("official", "torchvision", "hf")
EXTRAS: tuple[str, ...] = ("identity", "bbox", "landmarks")


class ManifestError(ValueError):
    """A manifest is missing, unreadable or does not follow the schema."""


def load_manifest(shard_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``shard_dir/manifest.json``; errors name the file and the key."""
    path = Path(shard_dir) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest (pack the data first: celeba-dist pack SOURCE {shard_dir})") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON: {e}") from None
    validate_manifest(manifest, where=str(path))
    return manifest


def write_manifest(shard_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Validate ``manifest`` and write it atomically to ``shard_dir/manifest.json``."""
    path = Path(shard_dir) / MANIFEST_NAME
    validate_manifest(manifest, where=str(path))
    write_json(path, manifest, indent=1)
    return path


def split_shards(manifest: dict[str, Any], shard_dir: str | os.PathLike[str], split: str) -> list[tuple[str, int]]:
    """``(absolute shard path, num_samples)`` for every shard of ``split``, in order."""
    root = Path(shard_dir).resolve()
    return [(str(root / s["file"]), int(s["num_samples"])) for s in _split(manifest, split)["shards"]]


def shard_problems(manifest: dict[str, Any], shard_dir: str | os.PathLike[str], splits: list[str] | tuple[str, ...],
                   *, sha256: bool = False, part: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with the shard files of ``splits``: missing, another size, (``sha256``) another hash.

    A stat per shard (well under a second for a thousand shards); the hashes read every byte, so
    ``part=(i, n)`` checks only every n-th shard from the i-th (one share per process).
    """
    root = Path(shard_dir)
    problems = []
    entries = [s for split in splits for s in _split(manifest, split)["shards"]]
    for index, entry in enumerate(entries):
        path = root / entry["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{entry['file']}: missing")
            continue
        except OSError as exc:
            problems.append(f"{entry['file']}: cannot stat: {exc}")
            continue
        if size != entry["bytes"]:
            problems.append(f"{entry['file']}: {size} bytes, the manifest says {entry['bytes']}")
        elif sha256 and index % part[1] == part[0] and file_sha256(path) != entry["sha256"]:
            problems.append(f"{entry['file']}: sha256 differs from the manifest (damaged or replaced)")
    return problems


def shards_fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 over every shard's sha256, split by split: the same samples in the same shards, whatever
    the manifest's other fields say (its creation time) and wherever the folder lies."""
    digest = hashlib.sha256()
    for name in sorted(manifest["splits"]):
        digest.update(name.encode())
        for shard in manifest["splits"][name]["shards"]:
            digest.update(shard["sha256"].encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def positive_rates(manifest: dict[str, Any], split: str, attributes: list[str] | tuple[str, ...]) -> list[float]:
    """The fraction of positive labels of each of ``attributes`` in ``split``, in that order."""
    rates = _split(manifest, split)["positive_rates"]
    missing = [a for a in attributes if a not in rates]
    if missing:
        raise ManifestError(f"{MANIFEST_NAME}: attributes {missing} are not in the shards; "
                            f"they hold {manifest['attributes']}")
    return [float(rates[a]) for a in attributes]


def _split(manifest: dict[str, Any], split: str) -> dict[str, Any]:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ManifestError(f"{MANIFEST_NAME}: no split {split!r}; splits are {sorted(splits)}")
    return splits[split]


# -- validation ---------------------------------------------------------------------------------

def validate_manifest(manifest: Any, *, where: str = MANIFEST_NAME) -> None:
    """Raise :class:`ManifestError` naming ``where`` and the key of the first schema violation."""
    m = _expect(manifest, dict, where, "<top level>")
    if m.get("format") != FORMAT:
        raise ManifestError(f"{where}: key 'format' must be {FORMAT!r}, got {m.get('format')!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{where}: key 'format_version' must be {FORMAT_VERSION}, got {m.get('format_version')!r} "
                            "(re-pack the data with this version of celeba-dist)")
    for key in ("packer_version", "created"):
        _expect(m.get(key), str, where, key)
    attributes = _expect(m.get("attributes"), list, where, "attributes")
    if not attributes or not all(isinstance(a, str) for a in attributes) or len(set(attributes)) != len(attributes):
        raise ManifestError(f"{where}: key 'attributes' must be a non-empty list of distinct names")
    _validate_source(_expect(m.get("source"), dict, where, "source"), where)
    _expect(m.get("options"), dict, where, "options")
    _validate_image(_expect(m.get("image"), dict, where, "image"), where)
    extras = _expect(m.get("extras"), list, where, "extras")
    if any(e not in EXTRAS for e in extras):
        raise ManifestError(f"{where}: key 'extras' may only hold {list(EXTRAS)}, got {extras}")
    _validate_skipped(m.get("skipped"), where, "skipped")
    splits = _expect(m.get("splits"), dict, where, "splits")
    if sorted(splits) != sorted(SPLITS):
        raise ManifestError(f"{where}: key 'splits' must hold exactly {list(SPLITS)}, got {sorted(splits)}")
    for name in SPLITS:
        _validate_split(splits[name], attributes, where, f"splits.{name}")


def _expect(value: Any, kind: type, where: str, key: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}: key '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r:.80}")
    return value


def _validate_source(source: dict[str, Any], where: str) -> None:
    if source.get("kind") not in SOURCE_KINDS:
        raise ManifestError(f"{where}: key 'source.kind' must be one of {list(SOURCE_KINDS)}, "
                            f"got {source.get('kind')!r}")
    _expect(source.get("path"), str, where, "source.path")
    _expect(source.get("fingerprint"), str, where, "source.fingerprint")


def _validate_image(image: dict[str, Any], where: str) -> None:
    if image.get("encoding") != "jpeg":
        raise ManifestError(f"{where}: key 'image.encoding' must be 'jpeg', got {image.get('encoding')!r}")
    resize = image.get("resize")
    if resize is not None and not (isinstance(resize, list) and len(resize) == 2
                                   and all(isinstance(v, int) and v > 0 for v in resize)):
        raise ManifestError(f"{where}: key 'image.resize' must be null or [W, H], got {resize!r}")
    for key in ("quality", "width", "height"):
        value = image.get(key)
        if value is not None:
            _expect(value, int, where, f"image.{key}")


def _validate_split(split: Any, attributes: list[str], where: str, key: str) -> None:
    s = _expect(split, dict, where, key)
    num = _expect(s.get("num_samples"), int, where, f"{key}.num_samples")
    rates = _expect(s.get("positive_rates"), dict, where, f"{key}.positive_rates")
    if sorted(rates) != sorted(attributes):
        raise ManifestError(f"{where}: key '{key}.positive_rates' must have one rate per attribute")
    shards = _expect(s.get("shards"), list, where, f"{key}.shards")
    total = 0
    for i, shard in enumerate(shards):
        k = f"{key}.shards[{i}]"
        _expect(shard, dict, where, k)
        _expect(shard.get("file"), str, where, f"{k}.file")
        for field in ("num_samples", "bytes"):
            if _expect(shard.get(field), int, where, f"{k}.{field}") < 0:
                raise ManifestError(f"{where}: key '{k}.{field}' must be >= 0")
        sha = _expect(shard.get("sha256"), str, where, f"{k}.sha256")
        if len(sha) != 64:
            raise ManifestError(f"{where}: key '{k}.sha256' must be 64 hex digits")
        total += shard["num_samples"]
    if total != num:
        raise ManifestError(f"{where}: key '{key}.num_samples' is {num} but its shards hold {total}")
    converted = _expect(s.get("converted"), dict, where, f"{key}.converted")
    for reason, ids in converted.items():
        _expect(ids, list, where, f"{key}.converted.{reason}")
    _validate_skipped(s.get("skipped"), where, f"{key}.skipped")


def _validate_skipped(skipped: Any, where: str, key: str) -> None:
    for i, item in enumerate(_expect(skipped, list, where, key)):
        if not (isinstance(item, dict) and isinstance(item.get("id"), str) and isinstance(item.get("reason"), str)):
            raise ManifestError(f"{where}: key '{key}[{i}]' must be {{'id': str, 'reason': str}}")
