"""The manifest of a finished pack: built from the progress record, written only when it changed, summarised."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from celeba_dist import __version__
from celeba_dist.pack.encode import RESAMPLE
from celeba_dist.pack.options import PackOptions
from celeba_dist.pack.plan import Plan
from celeba_dist.pack.progress import Progress
from celeba_dist.pack.sources import SourceData
from celeba_dist.shards.layout import SPLITS
from celeba_dist.shards.manifest import EXTRAS, FORMAT, FORMAT_VERSION, MANIFEST_NAME, write_manifest

log = logging.getLogger(__name__)


def build_manifest(data: SourceData, plan: Plan, options: PackOptions, progress: Progress) -> dict[str, Any]:
    """The manifest of the finished shards in ``progress``."""
    splits = {s: _split_manifest(data, plan, s, progress.entries(s)) for s in SPLITS}
    sizes = {tuple(size) for s in SPLITS for e in progress.entries(s) for size in e["sizes"]}
    reencoded = options.resize is not None or any(v["converted"][k] for v in splits.values() for k in v["converted"])
    width, height = sizes.pop() if len(sizes) == 1 else (None, None)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "packer_version": __version__,
        "attributes": plan.attributes,
        "source": _source_manifest(data, plan, options),
        "options": {**options.as_json(),
                    "split_ratios": list(plan.split_ratios) if plan.split_ratios else None,
                    "stratify": list(plan.stratify) if plan.stratify is not None else None},
        "image": {"encoding": "jpeg", "resize": list(options.resize) if options.resize else None,
                  "resample": RESAMPLE if options.resize else None,
                  "quality": options.quality if reencoded else None, "width": width, "height": height},
        "extras": [e for e in EXTRAS if e in data.extras],
        "splits": splits,
        "skipped": sorted(({"id": s["id"], "reason": s["reason"]} for s in data.skipped
                           if _skip_split(s, plan) is None), key=lambda s: s["id"]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _source_manifest(data: SourceData, plan: Plan, options: PackOptions) -> dict[str, Any]:
    """The source and its partition; a generated one (``generated``, ``resplit``) with how it was drawn."""
    source = {"kind": data.kind, "path": data.path, "fingerprint": data.fingerprint, "partition": plan.partition}
    if plan.split_ratios is not None:
        source["split"] = {"ratios": list(plan.split_ratios), "seed": options.seed,
                           "stratify": list(plan.stratify or ())}
    return source


def _skip_split(skip: dict[str, Any], plan: Plan) -> str | None:
    """The split a bad source row was dropped from; None (before splitting) when the partition is not the source's."""
    return skip["split"] if plan.partition == "source" else None


def _split_manifest(data: SourceData, plan: Plan, split: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    image_skips = [s for e in entries for s in e["skipped"]]
    bad = {s["id"] for s in image_skips}
    rows = [r for r in plan.rows[split] if data.ids[r] not in bad]
    rates = data.labels[rows][:, plan.columns].mean(axis=0) if rows else np.zeros(len(plan.columns))
    converted: dict[str, list[str]] = {"cmyk": [], "grayscale": [], "png": []}
    for entry in entries:
        for reason, ids in entry["converted"].items():
            converted.setdefault(reason, []).extend(ids)
    label_skips = [{"id": s["id"], "reason": s["reason"]} for s in data.skipped if _skip_split(s, plan) == split]
    return {
        "num_samples": sum(e["num_samples"] for e in entries),
        "positive_rates": {a: round(float(r), 6) for a, r in zip(plan.attributes, rates)},
        "shards": [{k: e[k] for k in ("file", "num_samples", "bytes", "sha256")} for e in entries],
        "converted": {k: sorted(v) for k, v in sorted(converted.items())},
        "skipped": sorted(label_skips + image_skips, key=lambda s: s["id"]),
    }


def write_manifest_if_changed(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest unless an identical one (``created`` aside) is already there."""
    path = out_dir / MANIFEST_NAME
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        if isinstance(old, dict) and {**old, "created": ""} == {**manifest, "created": ""}:
            log.info("%s is up to date", path)
            return
    write_manifest(out_dir, manifest)


def log_summary(manifest: dict[str, Any], *, images: int, seconds: float, total_seconds: float) -> None:
    """Log per split what was packed, converted and skipped, and how fast."""
    for split in SPLITS:
        s = manifest["splits"][split]
        converted = {k: len(v) for k, v in s["converted"].items() if v}
        log.info("%-5s %7d images in %4d shards, %.1f MB; converted %s; skipped %d", split, s["num_samples"],
                 len(s["shards"]), sum(x["bytes"] for x in s["shards"]) / 1e6, converted or "none", len(s["skipped"]))
    if manifest["skipped"]:
        log.info("skipped before splitting: %d", len(manifest["skipped"]))
    log.info("packed %d images in %.1f s (%.0f images/s; %.1f s in all, reading the source included)",
             images, seconds, images / max(seconds, 1e-9), total_seconds)
