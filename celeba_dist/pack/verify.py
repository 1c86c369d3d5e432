"""Checking packed shards against their manifest: files, sizes, sha256, sample counts, keys, images, labels.

Needs neither torch nor webdataset: the shards are read with :mod:`tarfile`.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from celeba_dist.pack.samples import sample_members
from celeba_dist.shards.layout import SPLITS, split_key
from celeba_dist.shards.manifest import ManifestError, file_sha256, load_manifest
from celeba_dist.workers import ordered_map, process_pool


@dataclass(frozen=True)
class ExpectedSample:
    """What every sample must look like, from the manifest."""

    attributes: list[str]
    extras: list[str]
    width: int | None
    height: int | None

    def members(self) -> set[str]:
        """The member suffixes a sample must have."""
        return sample_members(self.extras)


@dataclass
class ShardReport:
    """One shard's problems and its first and last keys (None: no samples)."""

    problems: list[str]
    first_key: str | None = None
    last_key: str | None = None


def verify(out_dir: Path, *, workers: int = 1) -> list[str]:
    """Every problem found checking the shards of ``out_dir`` against its manifest (empty: all good)."""
    try:
        manifest = load_manifest(out_dir)
    except ManifestError as e:
        return [str(e)]
    shards = [shard for s in SPLITS for shard in manifest["splits"][s]["shards"]]
    reports = _verify_shards(out_dir, shards, _expected_sample(manifest), workers=workers)
    report_of = iter(reports)
    problems: list[str] = []
    for split in SPLITS:
        split_shards = manifest["splits"][split]["shards"]
        problems += _split_problems(split_shards, [next(report_of) for _ in split_shards])
    return problems + _unlisted_shards(out_dir, {shard["file"] for shard in shards})


def _expected_sample(manifest: dict[str, Any]) -> ExpectedSample:
    image = manifest["image"]
    return ExpectedSample(manifest["attributes"], manifest["extras"], image["width"], image["height"])


def _verify_shards(out_dir: Path, shards: list[dict[str, Any]], expected: ExpectedSample, *,
                   workers: int) -> list[ShardReport]:
    """One report per shard, in order, checked in ``workers`` processes."""
    tasks = [(str(out_dir / shard["file"]), shard, expected) for shard in shards]
    with process_pool(workers if len(tasks) > 1 else 1) as pool:
        results = ordered_map(pool, verify_shard, tasks, chunksize=1)
        return list(tqdm(results, total=len(tasks), unit="shard", desc="verify", file=sys.stderr, disable=None))


def _split_problems(shards: list[dict[str, Any]], reports: list[ShardReport]) -> list[str]:
    """The problems of one split's shards: their reports', and keys that do not follow the previous shard's."""
    problems: list[str] = []
    last_key = ""
    for shard, report in zip(shards, reports):
        problems += report.problems
        if report.first_key is not None and report.first_key <= last_key:
            problems.append(f"{shard['file']}: key {report.first_key} does not follow {last_key} "
                            "of the previous shard")
        last_key = report.last_key or last_key
    return problems


def _unlisted_shards(out_dir: Path, listed: set[str]) -> list[str]:
    on_disk = [str(p.relative_to(out_dir)) for s in SPLITS for p in sorted((out_dir / s).glob("*.tar"))]
    return [f"{name}: a shard file the manifest does not list" for name in on_disk if name not in listed]


def verify_shard(task: tuple[str, dict[str, Any], ExpectedSample]) -> ShardReport:
    """Check one shard: exists, size, sha256, then every sample (members, keys, image, labels)."""
    path, entry, expected = task
    name = entry["file"]
    if not os.path.isfile(path):
        return ShardReport([f"{name}: missing"])
    problems = []
    if os.path.getsize(path) != entry["bytes"]:
        problems.append(f"{name}: {os.path.getsize(path)} bytes, the manifest says {entry['bytes']}")
    if file_sha256(Path(path)) != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest (the file is damaged or was replaced)")
    try:
        samples = read_tar_samples(path)
    except (tarfile.TarError, OSError) as e:
        return ShardReport(problems + [f"{name}: not a readable tar file ({e})"])
    keys = [key for key, _ in samples]
    if len(samples) != entry["num_samples"]:
        problems.append(f"{name}: {len(samples)} samples, the manifest says {entry['num_samples']}")
    if keys != sorted(set(keys)):
        problems.append(f"{name}: keys are not unique and in ascending order")
    for key, members in samples:
        problems += [f"{name}: sample {key}: {p}" for p in check_sample(members, expected)]
    return ShardReport(problems, keys[0] if keys else None, keys[-1] if keys else None)


def read_tar_samples(path: str) -> list[tuple[str, dict[str, bytes]]]:
    """``(key, {member suffix: bytes})`` per sample, grouped the way WebDataset groups them."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, suffix = split_key(info.name)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][suffix] = tar.extractfile(info).read()  # type: ignore[union-attr]
    return samples


def check_sample(members: dict[str, bytes], expected: ExpectedSample) -> list[str]:
    """Problems of one sample: its member set, a decodable image of the right size, its labels."""
    problems = []
    if set(members) != expected.members():
        problems.append(f"members {sorted(members)}, expected {sorted(expected.members())}")
    if "jpg" in members:
        problems += _image_problems(members["jpg"], expected)
    return problems + _label_problems(members.get("attr.json", b"null"), expected)


def _image_problems(jpg: bytes, expected: ExpectedSample) -> list[str]:
    try:
        with Image.open(io.BytesIO(jpg)) as image:
            image.load()
            problems = []
            if image.format != "JPEG" or image.mode != "RGB":
                problems.append(f"image is {image.format} {image.mode}, expected an RGB JPEG")
            if expected.width is not None and image.size != (expected.width, expected.height):
                problems.append(f"image is {image.size[0]}x{image.size[1]}, "
                                f"the manifest says {expected.width}x{expected.height}")
            return problems
    except Exception as e:  # PIL raises many kinds for bad data; every one is a problem to report
        return [f"image does not decode ({type(e).__name__}: {e})"]


def _label_problems(attr_json: bytes, expected: ExpectedSample) -> list[str]:
    try:
        labels = json.loads(attr_json)
    except json.JSONDecodeError:
        return ["attr.json is not JSON"]
    if not (isinstance(labels, list) and len(labels) == len(expected.attributes)
            and all(v in (0, 1) for v in labels)):
        return [f"attr.json is not a list of {len(expected.attributes)} values 0/1"]
    return []
