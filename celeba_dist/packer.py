"""Pack a CelebA source into WebDataset shards (``celeba-dist pack``) and check them (``celeba-dist verify``).

The steps, in order:

1. Read and validate the source in full (:mod:`celeba_dist.sources`); nothing is written before
   every label file has passed.
2. Plan: assign splits (the source's own partition, or a generated one), apply ``--limit``, sort
   each split by id. The plan, the source fingerprint and the options that shape the bytes are
   hashed into the *plan fingerprint*.
3. Check ``OUT_DIR``: shards of another source or other options are refused; shards a previous
   run of the same plan completed (``OUT_DIR/.pack-progress.json``) are kept once their sha256
   checks out, and only what is missing is written.
4. Worker processes read and fully decode every image, convert the ones that are not RGB JPEGs
   (or all, with ``--resize``); one writer streams the ordered results into shards, each under a
   temporary name, fsynced and renamed when complete, then recorded in the progress file.
5. The manifest (:mod:`celeba_dist.manifest`) is written last, atomically.

Deterministic choices, documented because users rely on them (``rank(x)`` is
``sha256(f"{salt}:{seed}:{id}")`` with salt ``split`` or ``limit``):

* Generated split (a source without a partition): images are grouped by their values of the
  ``--stratify`` attributes; within a group, ordered by ``rank``, the first ``floor(n*r_train + 0.5)``
  go to train, those up to ``floor(n*(r_train + r_val) + 0.5)`` to val, the rest to test.
* ``--limit N``: split ``s`` of ``n_s`` images (``n`` in all) gets ``floor(N*n_s/n)`` images, and the
  splits with the largest remainders (ties: train, val, test) one more each until the quotas sum to
  ``N``; within a split the images of smallest ``rank`` are taken.
* ``--resize WxH``: PIL ``Image.resize((W, H), BICUBIC)`` of the whole image (the aspect ratio is not
  kept), re-encoded as JPEG at ``--quality``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import tarfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from celeba_dist import __version__, signals
from celeba_dist.attributes import CELEBA_ATTRIBUTES, resolve_attributes
from celeba_dist.manifest import (
    EXTRAS, FORMAT, FORMAT_VERSION, MANIFEST_NAME, SPLITS, ManifestError, fsync_dir, load_manifest, shard_file,
    write_json_atomic, write_manifest,
)
from celeba_dist.sources import ImageStore, SourceData, SourceError, open_source

log = logging.getLogger(__name__)

PROGRESS_NAME = ".pack-progress.json"
DEFAULT_SAMPLES_PER_SHARD = 256  # full CelebA train -> 636 shards: enough for 8 nodes x 8 GPUs x 8 workers
DEFAULT_SPLIT_RATIOS = (0.8, 0.1, 0.1)
DEFAULT_STRATIFY = ("Male",)
SHARD_MTIME = 946684800  # 2000-01-01: fixed tar metadata makes the shards byte-identical across runs
SHARD_USER = "celeba"
SHARD_MODE = 0o444
RESAMPLE = "bicubic"
_TAR_BLOCK, _TAR_RECORD = 512, 10240


class PackError(RuntimeError):
    """Packing cannot go on; the message says what to do."""


@dataclass(frozen=True)
class PackOptions:
    """Every option of ``celeba-dist pack`` (None: not given)."""

    samples_per_shard: int | None = DEFAULT_SAMPLES_PER_SHARD
    max_shard_bytes: int | None = None
    resize: tuple[int, int] | None = None
    quality: int = 95
    workers: int = 1
    limit: int | None = None
    skip_bad: bool = False
    split_ratios: tuple[float, float, float] | None = None
    stratify: tuple[str, ...] | None = None
    attributes: tuple[str, ...] | None = None
    seed: int = 0
    image_column: str | None = None
    id_column: str | None = None
    identity_column: str | None = None

    def content(self) -> dict[str, Any]:
        """The options that shape the shards' bytes (``workers`` and ``skip_bad`` do not)."""
        out = asdict(self)
        for key in ("workers", "skip_bad"):
            out.pop(key)
        return json.loads(json.dumps(out))


# -- command line -------------------------------------------------------------------------------

def default_workers() -> int:
    """One per core, at most 8: past that the single writer (about 5,000 samples/s) is the limit."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="celeba-dist pack", description=doc.split("\n\n")[0],
                                epilog=doc[doc.find("Deterministic choices"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a CelebA folder (official or torchvision layout; images as img_align_celeba/ "
                                  "or img_align_celeba.zip) or hf:PATH_OR_NAME")
    p.add_argument("out_dir", type=Path, help="output folder: manifest.json and <split>/celeba-<split>-NNNNNN.tar")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=_positive_int, default=None,
                      help=f"images per shard (default {DEFAULT_SAMPLES_PER_SHARD})")
    size.add_argument("--max-shard-bytes", type=_byte_size, default=None,
                      help="cap on a shard's size instead, e.g. 100000000 or 100M "
                           "(a lone larger image still gets a shard)")
    p.add_argument("--resize", type=_resize, default=None, metavar="WxH",
                   help="resize every whole image to W x H (bicubic, aspect ratio not kept) and re-encode it")
    p.add_argument("--quality", type=_quality, default=95, help="JPEG quality of re-encoded images (default 95)")
    p.add_argument("--workers", type=_positive_int, default=default_workers(), help="image-decoding processes")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="pack N images in all, each split keeping its share, chosen by --seed (see below)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad rows and missing or corrupt images (listed in the manifest) instead of failing")
    p.add_argument("--split-ratios", type=_ratios, default=None, metavar="TRAIN,VAL,TEST",
                   help="for sources without a partition (default 0.8,0.1,0.1)")
    p.add_argument("--stratify", type=_names, default=None, metavar="ATTR,...",
                   help="attributes the generated split keeps balanced (default Male; 'none' for none)")
    p.add_argument("--attributes", default=None, metavar="NAMES",
                   help="attributes to pack, comma-separated, or 'all' / 'drawn' (default: the 40 CelebA ones)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated split and of --limit (default 0)")
    p.add_argument("--image-column", default=None, help="hf: the image column, when it cannot be detected")
    p.add_argument("--id-column", default=None, help="hf: the image id / file name column")
    p.add_argument("--identity-column", default=None, help="hf: the person identity column (default: celeb_id)")
    return p


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _byte_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMG]?)B?", text.strip(), re.IGNORECASE)
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 100000000 or 100M)")
    return int(match.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[match.group(2).upper()]


def _resize(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip().lower())
    if not match or min(int(match.group(1)), int(match.group(2))) < 1:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 64x64, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"JPEG quality must be 1..100, got {value}")
    return value


def _ratios(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"expected three non-negative fractions summing to 1, e.g. 0.8,0.1,0.1, "
                                         f"got {text!r}")
    return values  # type: ignore[return-value]


def _names(text: str) -> tuple[str, ...]:
    return () if text.strip().lower() == "none" else tuple(n.strip() for n in text.split(",") if n.strip())


def options_from_args(args: argparse.Namespace) -> PackOptions:
    try:
        attributes = tuple(resolve_attributes(args.attributes)) if args.attributes is not None else None
    except ValueError as e:
        raise PackError(f"--attributes: {e}") from None
    if attributes == ():
        raise PackError("--attributes: no attribute named")
    return PackOptions(
        samples_per_shard=None if args.max_shard_bytes else (args.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD),
        max_shard_bytes=args.max_shard_bytes, resize=args.resize, quality=args.quality, workers=args.workers,
        limit=args.limit, skip_bad=args.skip_bad, split_ratios=args.split_ratios, stratify=args.stratify,
        attributes=attributes, seed=args.seed, image_column=args.image_column, id_column=args.id_column,
        identity_column=args.identity_column,
    )


def main(argv: list[str] | None = None) -> int:
    """``celeba-dist pack``: exit status 0 on success, 1 on any error (printed to stderr)."""
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        pack(args.source, args.out_dir, options_from_args(args))
    except (SourceError, PackError, ManifestError) as e:
        print(f"celeba-dist pack: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("celeba-dist pack: interrupted; finished shards are kept, run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0


def _setup_logging() -> None:
    from celeba_dist.logs import setup_logging

    setup_logging()


# -- planning -----------------------------------------------------------------------------------

@dataclass
class Plan:
    """What goes where: per split, source rows in id order; the packed attributes."""

    attributes: list[str]
    columns: list[int]  # positions of `attributes` in the source's attribute_names
    rows: dict[str, list[int]]  # split -> source row indices, sorted by id
    generated: bool  # the split was generated (the source has no partition)
    split_ratios: tuple[float, float, float] | None
    stratify: tuple[str, ...] | None

    def fingerprint(self, data: SourceData, options: PackOptions) -> str:
        ids = {s: [data.ids[r] for r in rows] for s, rows in self.rows.items()}
        text = json.dumps({"source": data.fingerprint, "attributes": self.attributes, "options": options.content(),
                           "extras": sorted(data.extras), "ids": ids}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def make_plan(data: SourceData, options: PackOptions) -> Plan:
    """Assign splits (generating them if the source has none), apply ``--limit``, sort by id."""
    attributes = list(options.attributes or CELEBA_ATTRIBUTES)
    missing = [a for a in attributes if a not in data.attribute_names]
    if missing:
        raise PackError(f"the source has no attribute(s) {missing}; it has {data.attribute_names}")
    if data.splits is not None:
        if options.split_ratios is not None or options.stratify is not None:
            raise PackError("--split-ratios/--stratify only apply to sources without a partition; "
                            "this source has its own train/val/test partition")
        splits, ratios, stratify = data.splits, None, None
    else:
        ratios = options.split_ratios or DEFAULT_SPLIT_RATIOS
        stratify = options.stratify if options.stratify is not None else DEFAULT_STRATIFY
        unknown = [a for a in stratify if a not in data.attribute_names]
        if unknown:
            raise PackError(f"--stratify: the source has no attribute(s) {unknown}")
        strata = data.labels[:, [data.attribute_names.index(a) for a in stratify]]
        splits = generate_partition(data.ids, strata, ratios, options.seed)
    rows = {s: np.nonzero(splits == k)[0].tolist() for k, s in enumerate(SPLITS)}
    if not any(rows.values()):
        raise PackError("the source has no usable images")
    if options.limit is not None:
        rows = limit_rows(rows, data.ids, options.limit, options.seed)
    rows = {s: sorted(r, key=data.ids.__getitem__) for s, r in rows.items()}
    columns = [data.attribute_names.index(a) for a in attributes]
    return Plan(attributes, columns, rows, data.splits is None, ratios, stratify)


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


# -- images -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Encoded:
    """A worker's result for one image: the JPEG to store, or the error that makes it bad."""

    jpg: bytes | None
    size: tuple[int, int] | None = None
    converted: str | None = None  # why it was re-encoded: "png", "grayscale", "cmyk", ...
    error: str | None = None


def conversion_reason(image: Image.Image) -> str | None:
    """Why an image must be converted to an RGB JPEG (None: it is one already)."""
    if image.format != "JPEG":
        return (image.format or "unknown").lower()
    if image.mode in ("L", "LA", "1", "I", "I;16", "F"):
        return "grayscale"
    return None if image.mode == "RGB" else image.mode.lower()


def encode_image(data: bytes, *, resize: tuple[int, int] | None, quality: int) -> Encoded:
    """Fully decode ``data``; keep it as is if it is an RGB JPEG and no resize is asked, else re-encode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # the full decode: truncated or corrupt data raises here
            reason = conversion_reason(image)
            if reason is None and resize is None:
                return Encoded(data, image.size)
            rgb = image.convert("RGB")
    except UnidentifiedImageError:
        return Encoded(None, error="not an image file (PIL cannot identify it)")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return Encoded(None, error=f"corrupt or truncated image: {e}")
    if resize is not None:
        rgb = rgb.resize(resize, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return Encoded(out.getvalue(), rgb.size, reason)


@dataclass(frozen=True)
class ImageEncoder:
    """Reads one image from the store and encodes it; one lives in each worker process."""

    store: ImageStore
    resize: tuple[int, int] | None
    quality: int

    def __call__(self, locator: Any) -> Encoded:
        try:
            data = self.store.read(locator)
        except (OSError, KeyError) as e:
            return Encoded(None, error=f"cannot read the image: {e}")
        return encode_image(data, resize=self.resize, quality=self.quality)


_worker_encoder: ImageEncoder | None = None


def _init_worker(encoder: ImageEncoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "SIGUSR2"):
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def _encode_in_worker(locator: Any) -> Encoded:
    assert _worker_encoder is not None
    return _worker_encoder(locator)


def _pool(workers: int, initializer: Callable[..., None], initargs: tuple) -> Any:
    # fork: workers inherit the opened source (a memory-mapped dataset) instead of unpickling it.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    return context.Pool(workers, initializer=initializer, initargs=initargs)


# -- shards -------------------------------------------------------------------------------------

def tar_bytes(member_bytes: int) -> int:
    """Size of a finished tar whose members take ``member_bytes`` (headers and padding included)."""
    return math.ceil((member_bytes + 2 * _TAR_BLOCK) / _TAR_RECORD) * _TAR_RECORD


def sample_member_bytes(sample: dict[str, Any]) -> int:
    return sum(_TAR_BLOCK + math.ceil(len(v) / _TAR_BLOCK) * _TAR_BLOCK for k, v in sample.items() if k != "__key__")


class ShardWriter:
    """Streams samples into one shard under ``<name>.tmp``; :meth:`close` fsyncs and renames it."""

    def __init__(self, out_dir: Path, split: str, index: int, start: int):
        from webdataset import TarWriter  # imported here: webdataset imports torch, verify needs neither

        self.out_dir, self.split, self.index, self.start = out_dir, split, index, start
        self.file = shard_file(split, index)
        self.path = out_dir / self.file
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = open(self.tmp, "wb")
        self._tar = TarWriter(self._stream, user=SHARD_USER, group=SHARD_USER, mode=SHARD_MODE,
                              mtime=SHARD_MTIME, encoder=False)
        self.num_samples = 0
        self.member_bytes = 0
        self.converted: dict[str, list[str]] = defaultdict(list)
        self.skipped: list[dict[str, str]] = []
        self.sizes: set[tuple[int, int]] = set()

    def full(self, member_bytes: int, options: PackOptions) -> bool:
        """Would one more sample of ``member_bytes`` overflow the shard? (An empty shard takes anything.)"""
        if self.num_samples == 0:
            return False
        if options.samples_per_shard is not None:
            return self.num_samples >= options.samples_per_shard
        return tar_bytes(self.member_bytes + member_bytes) > (options.max_shard_bytes or 0)

    def add(self, sample: dict[str, Any], encoded: Encoded, member_bytes: int) -> None:
        self._tar.write(sample)
        self.num_samples += 1
        self.member_bytes += member_bytes
        if encoded.converted:
            self.converted[encoded.converted].append(sample["__key__"])
        if encoded.size:
            self.sizes.add(encoded.size)

    def close(self, stop: int) -> dict[str, Any]:
        """Finish the shard: close the tar, fsync, rename; return its progress entry."""
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
        finally:
            self.tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_sample(data: SourceData, plan: Plan, row: int, jpg: bytes) -> dict[str, Any]:
    """The WebDataset sample of one image: ``jpg``, ``attr.json`` and the extras present."""
    labels = data.labels[row, plan.columns].tolist()
    sample: dict[str, Any] = {"__key__": data.ids[row], "jpg": jpg,
                              "attr.json": json.dumps(labels, separators=(",", ":")).encode()}
    for name, extra in data.extras.items():
        values = extra.values[row].tolist()
        if extra.fields is None:
            sample["identity.txt"] = str(values).encode()
        else:
            sample[f"{name}.json"] = json.dumps(dict(zip(extra.fields, values)), separators=(",", ":")).encode()
    return sample


# -- resuming -----------------------------------------------------------------------------------

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
        self.shards[split][index] = entry
        self.save()

    def save(self) -> None:
        body = {s: [self.shards[s][i] for i in sorted(self.shards[s])] for s in SPLITS}
        write_json_atomic(self.path, {**self.header, "splits": body})

    def entries(self, split: str) -> list[dict[str, Any]]:
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
    for what, old in ((MANIFEST_NAME, old_manifest), (PROGRESS_NAME, old_progress)):
        old_source = old.get("source") if old is not None and isinstance(old.get("source"), dict) else {}
        if old is not None and old_source.get("fingerprint") != data.fingerprint:
            raise PackError(f"{out_dir} already holds shards from a different source, or from this one before "
                            f"its labels changed ({what}: {old_source.get('kind')} {old_source.get('path')}); "
                            "pack into an empty folder or delete this one")
    if old_progress is not None and old_progress.get("plan") != plan_fp:
        changed = {k: [old_progress.get("options", {}).get(k), v] for k, v in options.content().items()
                   if old_progress.get("options", {}).get(k) != v}
        raise PackError(f"{out_dir} holds shards of this source packed with other options or another image "
                        f"selection (changed [old, new]: {changed or 'the selected images'}); "
                        "pack into an empty folder or delete this one")
    if old_progress is not None:
        for split in SPLITS:
            for i, entry in enumerate(old_progress.get("splits", {}).get(split, [])):
                progress.shards[split][i] = entry
    _clear_temporaries(out_dir)
    known = {e["file"] for s in SPLITS for e in progress.entries(s)}
    foreign = sorted(str(p.relative_to(out_dir)) for s in SPLITS for p in (out_dir / s).glob("*.tar")
                     if str(p.relative_to(out_dir)) not in known)
    if foreign:
        raise PackError(f"{out_dir} holds shards that no pack progress record describes ({foreign[:3]}...); "
                        "pack into an empty folder or delete this one")
    return progress


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PackError(f"{path}: unreadable ({e}); pack into an empty folder or delete this one") from None
    if not isinstance(value, dict):
        raise PackError(f"{path}: not a JSON object; pack into an empty folder or delete this one")
    return value


def _clear_temporaries(out_dir: Path) -> None:
    for folder in [out_dir] + [out_dir / s for s in SPLITS]:
        for tmp in folder.glob("*.tmp") if folder.is_dir() else []:
            log.info("removing %s, left by an interrupted run", tmp)
            tmp.unlink()


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
    path = out_dir / entry["file"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and file_sha256(path) == entry["sha256"]


# -- packing ------------------------------------------------------------------------------------

def pack(source: str, out_dir: Path, options: PackOptions) -> dict[str, Any]:
    """Pack ``source`` into ``out_dir`` (resuming a previous run of the same plan); return the manifest."""
    started = time.monotonic()
    data = open_source(source, attributes=list(options.attributes) if options.attributes else None,
                       skip_bad=options.skip_bad, image_column=options.image_column, id_column=options.id_column,
                       identity_column=options.identity_column)
    plan = make_plan(data, options)
    log.info("%s (%s): %s", source, data.kind, ", ".join(f"{s} {len(plan.rows[s])}" for s in SPLITS))
    progress = open_out_dir(out_dir, data, options, plan.fingerprint(data, options))
    segments = plan_segments(plan, progress, out_dir)
    written_from = time.monotonic()
    if segments:
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # a manifest only ever describes finished shards
        out_dir.mkdir(parents=True, exist_ok=True)
        write_segments(data, plan, options, segments, progress, out_dir)
    else:
        log.info("%s: every shard is already there", out_dir)
    manifest = build_manifest(data, plan, options, progress)
    _write_manifest_if_changed(out_dir, manifest)
    now = time.monotonic()
    log_summary(manifest, images=sum(s.stop - s.start for s in segments), seconds=now - written_from,
                total_seconds=now - started)
    return manifest


def write_segments(data: SourceData, plan: Plan, options: PackOptions, segments: list[Segment],
                   progress: Progress, out_dir: Path) -> None:
    """Encode the images of ``segments`` in worker processes and write them, in order, into shards."""
    locators = (data.locators[plan.rows[seg.split][pos]] for seg in segments for pos in range(seg.start, seg.stop))
    encoder = ImageEncoder(data.images, options.resize, options.quality)
    total = sum(seg.stop - seg.start for seg in segments)
    signals.clear()
    signals.install_stop_handlers()
    pool = _pool(options.workers, _init_worker, (encoder,)) if options.workers > 1 else None
    try:
        results = pool.imap(_encode_in_worker, locators, chunksize=64) if pool else map(encoder, locators)
        with tqdm(total=total, unit="img", desc="pack", file=sys.stderr, disable=None, smoothing=0.05) as bar:
            for seg in segments:
                write_segment(data, plan, options, seg, _counted(results, bar), progress, out_dir)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        signals.restore_handlers()


def _counted(results: Iterator[Encoded], bar: tqdm) -> Iterator[Encoded]:
    for result in results:
        if signals.stop_requested():
            raise PackError(f"stopped by signal {signals.received_signals()}; finished shards are kept, "
                            "run the same command again to resume")
        bar.update(1)
        yield result


def write_segment(data: SourceData, plan: Plan, options: PackOptions, seg: Segment,
                  results: Iterator[Encoded], progress: Progress, out_dir: Path) -> None:
    """Write plan positions ``[seg.start, seg.stop)`` of ``seg.split``: roll over to a new shard when full."""
    rows = plan.rows[seg.split]
    writer: ShardWriter | None = None
    index, pending = seg.first_index, []  # pending: skips seen before the segment's first shard opens
    try:
        for pos in range(seg.start, seg.stop):
            row, encoded = rows[pos], next(results)
            if encoded.jpg is None:
                skip = _bad_image(data, row, encoded.error or "", options)
                (writer.skipped if writer else pending).append(skip)
                continue
            sample = make_sample(data, plan, row, encoded.jpg)
            size = sample_member_bytes(sample)
            if writer is not None and not seg.rebuild and writer.full(size, options):
                progress.record(seg.split, index, writer.close(stop=pos))
                writer, index = None, index + 1
            if writer is None:
                writer = ShardWriter(out_dir, seg.split, index, start=seg.start if index == seg.first_index else pos)
                writer.skipped, pending = pending, []
            writer.add(sample, encoded, size)
        if writer is None and seg.stop > seg.start:  # every image of the segment was bad: an empty shard
            writer = ShardWriter(out_dir, seg.split, index, start=seg.start)
            writer.skipped = pending
        if writer is not None:
            progress.record(seg.split, index, writer.close(stop=seg.stop))
            writer = None
    finally:
        if writer is not None:
            writer.abort()


def _bad_image(data: SourceData, row: int, error: str, options: PackOptions) -> dict[str, str]:
    where = data.images.describe(data.locators[row])
    if not options.skip_bad:
        raise PackError(f"image {data.ids[row]} ({where}): {error}; pass --skip-bad to skip bad images "
                        "(finished shards are kept: re-running resumes)")
    log.warning("skipping image %s (%s): %s", data.ids[row], where, error)
    return {"id": data.ids[row], "reason": error}


# -- the manifest -------------------------------------------------------------------------------

def build_manifest(data: SourceData, plan: Plan, options: PackOptions, progress: Progress) -> dict[str, Any]:
    """The manifest of the finished shards in ``progress``."""
    splits = {s: _split_manifest(data, plan, s, progress.entries(s)) for s in SPLITS}
    sizes = {tuple(size) for s in SPLITS for e in progress.entries(s) for size in e["sizes"]}
    reencoded = options.resize is not None or any(v["converted"][k] for v in splits.values() for k in v["converted"])
    width, height = sizes.pop() if len(sizes) == 1 else (None, None)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "packer_version": __version__,
        "attributes": plan.attributes,
        "source": {"kind": data.kind, "path": data.path, "fingerprint": data.fingerprint,
                   "partition": "generated" if plan.generated else "source"},
        "options": {**json.loads(json.dumps(asdict(options))),
                    "split_ratios": list(plan.split_ratios) if plan.split_ratios else None,
                    "stratify": list(plan.stratify) if plan.stratify is not None else None},
        "image": {"encoding": "jpeg", "resize": list(options.resize) if options.resize else None,
                  "resample": RESAMPLE if options.resize else None,
                  "quality": options.quality if reencoded else None, "width": width, "height": height},
        "extras": [e for e in EXTRAS if e in data.extras],
        "splits": splits,
        "skipped": sorted(({"id": s["id"], "reason": s["reason"]} for s in data.skipped if s["split"] is None),
                          key=lambda s: s["id"]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _split_manifest(data: SourceData, plan: Plan, split: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    image_skips = [s for e in entries for s in e["skipped"]]
    bad = {s["id"] for s in image_skips}
    rows = [r for r in plan.rows[split] if data.ids[r] not in bad]
    rates = data.labels[rows][:, plan.columns].mean(axis=0) if rows else np.zeros(len(plan.columns))
    converted: dict[str, list[str]] = {"cmyk": [], "grayscale": [], "png": []}
    for entry in entries:
        for reason, ids in entry["converted"].items():
            converted.setdefault(reason, []).extend(ids)
    label_skips = [{"id": s["id"], "reason": s["reason"]} for s in data.skipped if s["split"] == split]
    return {
        "num_samples": sum(e["num_samples"] for e in entries),
        "positive_rates": {a: round(float(r), 6) for a, r in zip(plan.attributes, rates)},
        "shards": [{k: e[k] for k in ("file", "num_samples", "bytes", "sha256")} for e in entries],
        "converted": {k: sorted(v) for k, v in sorted(converted.items())},
        "skipped": sorted(label_skips + image_skips, key=lambda s: s["id"]),
    }


def _write_manifest_if_changed(out_dir: Path, manifest: dict[str, Any]) -> None:
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
    for split in SPLITS:
        s = manifest["splits"][split]
        converted = {k: len(v) for k, v in s["converted"].items() if v}
        log.info("%-5s %7d images in %4d shards, %.1f MB; converted %s; skipped %d", split, s["num_samples"],
                 len(s["shards"]), sum(x["bytes"] for x in s["shards"]) / 1e6, converted or "none", len(s["skipped"]))
    if manifest["skipped"]:
        log.info("skipped before splitting: %d", len(manifest["skipped"]))
    log.info("packed %d images in %.1f s (%.0f images/s; %.1f s in all, reading the source included)",
             images, seconds, images / max(seconds, 1e-9), total_seconds)


# -- verify -------------------------------------------------------------------------------------

def verify(out_dir: Path, *, workers: int = 1) -> list[str]:
    """Every problem found checking the shards of ``out_dir`` against its manifest (empty: all good)."""
    try:
        manifest = load_manifest(out_dir)
    except ManifestError as e:
        return [str(e)]
    expected = ExpectedSample(manifest["attributes"], manifest["extras"], manifest["image"]["width"],
                              manifest["image"]["height"])
    shards = [shard for s in SPLITS for shard in manifest["splits"][s]["shards"]]
    tasks = [(str(out_dir / shard["file"]), shard, expected) for shard in shards]
    problems: list[str] = []
    pool = _pool(workers, _init_worker_signals, ()) if workers > 1 and len(tasks) > 1 else None
    try:
        results = pool.imap(verify_shard, tasks) if pool else map(verify_shard, tasks)
        reports = list(tqdm(results, total=len(tasks), unit="shard", desc="verify", file=sys.stderr, disable=None))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    report_of = iter(reports)
    for split in SPLITS:
        last_key = ""
        for shard in manifest["splits"][split]["shards"]:
            report = next(report_of)
            problems += report.problems
            if report.first_key is not None and report.first_key <= last_key:
                problems.append(f"{shard['file']}: key {report.first_key} does not follow {last_key} "
                                "of the previous shard")
            last_key = report.last_key or last_key
    listed = {shard["file"] for shard in shards}
    on_disk = [str(p.relative_to(out_dir)) for s in SPLITS for p in sorted((out_dir / s).glob("*.tar"))]
    problems += [f"{name}: a shard file the manifest does not list" for name in on_disk if name not in listed]
    return problems


@dataclass(frozen=True)
class ExpectedSample:
    attributes: list[str]
    extras: list[str]
    width: int | None
    height: int | None

    def members(self) -> set[str]:
        names = {"identity": "identity.txt", "bbox": "bbox.json", "landmarks": "landmarks.json"}
        return {"jpg", "attr.json"} | {names[e] for e in self.extras}


@dataclass
class ShardReport:
    problems: list[str]
    first_key: str | None = None
    last_key: str | None = None


def _init_worker_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
            folder, _, base = info.name.rpartition("/")
            key, _, suffix = base.partition(".")
            key = f"{folder}/{key}" if folder else key
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
        try:
            with Image.open(io.BytesIO(members["jpg"])) as image:
                image.load()
                if image.format != "JPEG" or image.mode != "RGB":
                    problems.append(f"image is {image.format} {image.mode}, expected an RGB JPEG")
                if expected.width is not None and image.size != (expected.width, expected.height):
                    problems.append(f"image is {image.size[0]}x{image.size[1]}, "
                                    f"the manifest says {expected.width}x{expected.height}")
        except Exception as e:  # PIL raises many kinds for bad data; every one is a problem to report
            problems.append(f"image does not decode ({type(e).__name__}: {e})")
    try:
        labels = json.loads(members.get("attr.json", b"null"))
        if not (isinstance(labels, list) and len(labels) == len(expected.attributes)
                and all(v in (0, 1) for v in labels)):
            problems.append(f"attr.json is not a list of {len(expected.attributes)} values 0/1")
    except json.JSONDecodeError:
        problems.append("attr.json is not JSON")
    return problems


def build_verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="celeba-dist verify", description="Check packed shards against their manifest: "
                                "files, sizes, sha256, sample counts, keys, every image decodes, every label list.")
    p.add_argument("out_dir", type=Path, help="a folder written by celeba-dist pack")
    p.add_argument("--workers", type=_positive_int, default=default_workers(), help="processes checking shards")
    return p


def verify_main(argv: list[str] | None = None) -> int:
    """``celeba-dist verify``: exit status 0 when every check passes, 1 listing all problems otherwise."""
    args = build_verify_parser().parse_args(argv)
    _setup_logging()
    problems = verify(args.out_dir, workers=args.workers)
    if problems:
        for problem in problems:
            print(f"celeba-dist verify: {problem}", file=sys.stderr)
        print(f"celeba-dist verify: {args.out_dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    manifest = load_manifest(args.out_dir)
    counts = ", ".join(f"{s} {manifest['splits'][s]['num_samples']}" for s in SPLITS)
    log.info("%s: all shards match the manifest (%s)", args.out_dir, counts)
    return 0
