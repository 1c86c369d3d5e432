"""The pack plan: which source rows go to which split, how many (``--limit``) and in which order.

``rank(x)`` is ``sha256(f"{salt}:{seed}:{id}")`` with salt ``split`` or ``limit``; the rules built on
it are documented in :mod:`celeba_dist.pack.cli` (they are part of ``celeba-dist pack --help``).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from celeba_dist.attributes import CELEBA_ATTRIBUTES
from celeba_dist.pack.options import PackError, PackOptions
from celeba_dist.pack.sources import SourceData
from celeba_dist.shards.layout import SPLITS

DEFAULT_SPLIT_RATIOS = (0.8, 0.1, 0.1)
DEFAULT_STRATIFY = ("Male",)


@dataclass
class Plan:
    """What goes where: per split, source rows in id order; the packed attributes."""

    attributes: list[str]
    columns: list[int]  # positions of `attributes` in the source's attribute_names
    rows: dict[str, list[int]]  # split -> source row indices, sorted by id
    partition: str  # "source" (its own), "generated" (it has none) or "resplit" (its own ignored)
    split_ratios: tuple[float, float, float] | None  # of a generated split (None: the source's own)
    stratify: tuple[str, ...] | None

    def fingerprint(self, data: SourceData, options: PackOptions) -> str:
        """sha256 of the source, the options that shape the bytes and the ids of every split."""
        ids = {s: [data.ids[r] for r in rows] for s, rows in self.rows.items()}
        text = json.dumps({"source": data.fingerprint, "attributes": self.attributes, "options": options.content(),
                           "extras": sorted(data.extras), "ids": ids}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def make_plan(data: SourceData, options: PackOptions) -> Plan:
    """Assign splits (generating them if the source has none, or with ``--resplit``), apply ``--limit``, sort by id."""
    attributes = list(options.attributes or CELEBA_ATTRIBUTES)
    missing = [a for a in attributes if a not in data.attribute_names]
    if missing:
        raise PackError(f"the source has no attribute(s) {missing}; it has {data.attribute_names}")
    splits, partition, ratios, stratify = assign_splits(data, options)
    rows = {s: np.nonzero(splits == k)[0].tolist() for k, s in enumerate(SPLITS)}
    if not any(rows.values()):
        raise PackError("the source has no usable images")
    if options.limit is not None:
        rows = limit_rows(rows, data.ids, options.limit, options.seed)
    rows = {s: sorted(r, key=data.ids.__getitem__) for s, r in rows.items()}
    columns = [data.attribute_names.index(a) for a in attributes]
    return Plan(attributes, columns, rows, partition, ratios, stratify)


def assign_splits(data: SourceData, options: PackOptions
                  ) -> tuple[np.ndarray, str, tuple[float, float, float] | None, tuple[str, ...] | None]:
    """(N,) split index per row, the :attr:`Plan.partition` kind, the ratios and strata used (None: the source's).

    The source's own partition, unless it has none or ``--resplit`` asks to ignore it: then a
    partition is generated (seeded by ``--seed``, stratified on ``--stratify``).
    """
    if data.splits is not None and options.resplit is None:
        if options.split_ratios is not None or options.stratify is not None:
            raise PackError("--split-ratios/--stratify only apply to sources without a partition, or with --resplit; "
                            "this source has its own train/val/test partition (--resplit TRAIN,VAL,TEST ignores it)")
        return data.splits, "source", None, None
    ratios = options.resplit or options.split_ratios or DEFAULT_SPLIT_RATIOS
    stratify = options.stratify if options.stratify is not None else DEFAULT_STRATIFY
    unknown = [a for a in stratify if a not in data.attribute_names]
    if unknown:
        raise PackError(f"--stratify: the source has no attribute(s) {unknown}")
    strata = data.labels[:, [data.attribute_names.index(a) for a in stratify]]
    partition = "generated" if data.splits is None else "resplit"
    return generate_partition(data.ids, strata, ratios, options.seed), partition, ratios, stratify


def _rank(salt: str, seed: int, image_id: str) -> bytes:
    return hashlib.sha256(f"{salt}:{seed}:{image_id}".encode()).digest()


def generate_partition(ids: list[str], strata: np.ndarray, ratios: tuple[float, float, float], seed: int) -> np.ndarray:
    """(N,) split index per image: per stratum, ordered by rank, cut at the rounded ratio boundaries."""
    groups: dict[bytes, list[int]] = defaultdict(list)
    for i, key in enumerate(np.ascontiguousarray(strata, dtype=np.uint8)):
        groups[key.tobytes()].append(i)
    out = np.empty(len(ids), dtype=np.int8)
    for members in groups.values():
        members.sort(key=lambda i: _rank("split", seed, ids[i]))
        n = len(members)
        cut1 = math.floor(n * ratios[0] + 0.5)
        cut2 = max(cut1, math.floor(n * (ratios[0] + ratios[1]) + 0.5))
        for pos, i in enumerate(members):
            out[i] = 0 if pos < cut1 else 1 if pos < cut2 else 2
    return out


def limit_rows(rows: dict[str, list[int]], ids: list[str], limit: int, seed: int) -> dict[str, list[int]]:
    """``limit`` rows in all, split by largest remainder, the smallest-rank rows of each split."""
    total = sum(len(r) for r in rows.values())
    if limit >= total:
        return rows
    exact = {s: limit * len(r) / total for s, r in rows.items()}
    quota = {s: math.floor(q) for s, q in exact.items()}
    by_remainder = sorted(rows, key=lambda s: (-(exact[s] - quota[s]), SPLITS.index(s)))
    for s in by_remainder[: limit - sum(quota.values())]:
        quota[s] += 1
    return {s: sorted(r, key=lambda i: _rank("limit", seed, ids[i]))[: quota[s]] for s, r in rows.items()}
