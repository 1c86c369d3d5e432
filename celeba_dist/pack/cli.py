"""Pack a CelebA source into WebDataset shards (``celeba-dist pack``) and check them (``celeba-dist verify``).

The steps, in order:

1. Read and validate the source in full (:mod:`celeba_dist.pack.sources`); nothing is written before
   every label file has passed.
2. Plan (:mod:`celeba_dist.pack.plan`): assign splits (the source's own partition, or a generated
   one when it has none or ``--resplit`` ignores it), apply ``--limit``, sort each split by id. The
   plan, the source fingerprint and the options that shape the bytes are hashed into the *plan
   fingerprint*.
3. Check ``OUT_DIR`` (:mod:`celeba_dist.pack.progress`): shards of another source or other options
   are refused; shards a previous run of the same plan completed (``OUT_DIR/.pack-progress.json``)
   are kept once their sha256 checks out, and only what is missing is written.
4. Worker processes read and fully decode every image, convert the ones that are not RGB JPEGs
   (or all, with ``--resize``) (:mod:`celeba_dist.pack.encode`); one writer streams the ordered results
   into shards (:mod:`celeba_dist.pack.writer`), each under a temporary name, fsynced and renamed
   when complete, then recorded in the progress file.
5. The manifest (:mod:`celeba_dist.pack.manifest`; schema in :mod:`celeba_dist.shards.manifest`) is
   written last, atomically.

``celeba-dist verify`` checks the shards against the manifest (:mod:`celeba_dist.pack.verify`).

Deterministic choices, documented because users rely on them (``rank(x)`` is
``sha256(f"{salt}:{seed}:{id}")`` with salt ``split`` or ``limit``):

* Generated split (a source without a partition, ratios ``--split-ratios``; or any source with
  ``--resplit TRAIN,VAL,TEST``, which ignores its list_eval_partition.txt / torchvision / HF split):
  images are grouped by their values of the ``--stratify`` attributes; within a group, ordered by
  ``rank``, the first ``floor(n*r_train + 0.5)`` go to train, those up to
  ``floor(n*(r_train + r_val) + 0.5)`` to val, the rest to test. ``--resplit`` with a different
  ``--split-ratios`` is an error (the same ratios are accepted). The manifest records the split as
  ``source.partition`` ``generated`` or ``resplit``, with ``source.split`` (ratios, seed, stratify):
  numbers measured on such a split are not comparable with results on the official partition (the
  same person can be in train and test).
* ``--limit N``: split ``s`` of ``n_s`` images (``n`` in all) gets ``floor(N*n_s/n)`` images, and the
  splits with the largest remainders (ties: train, val, test) one more each until the quotas sum to
  ``N``; within a split the images of smallest ``rank`` are taken.
* ``--resize WxH``: PIL ``Image.resize((W, H), BICUBIC)`` of the whole image (the aspect ratio is not
  kept), re-encoded as JPEG at ``--quality``.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from celeba_dist import signals
from celeba_dist.attributes import resolve_attributes
from celeba_dist.cli_args import positive_int
from celeba_dist.diskio import DiskFullError
from celeba_dist.pack.encode import Encoded, ImageEncoder, encoded_images
from celeba_dist.pack.manifest import build_manifest, log_summary, write_manifest_if_changed
from celeba_dist.pack.options import DEFAULT_SAMPLES_PER_SHARD, PackError, PackOptions
from celeba_dist.pack.plan import Plan, make_plan
from celeba_dist.pack.progress import (Progress, Segment, create_out_dir, locked_out_dir, open_out_dir,
                                       plan_segments)
from celeba_dist.pack.samples import make_sample
from celeba_dist.pack.sources import SourceData, SourceError, open_source
from celeba_dist.pack.verify import verify
from celeba_dist.pack.writer import ShardWriter, sample_member_bytes
from celeba_dist.shards.layout import SPLITS
from celeba_dist.shards.manifest import ManifestError, load_manifest
from celeba_dist.workers import WorkerDiedError, default_workers

__all__ = ["DEFAULT_SAMPLES_PER_SHARD", "PackError", "PackOptions", "build_parser", "build_verify_parser",
           "default_workers", "main", "pack", "verify", "verify_main"]

log = logging.getLogger(__name__)


# -- command line -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The parser of ``celeba-dist pack``; its help ends with the deterministic choices above."""
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="celeba-dist pack", description=doc.split("\n\n")[0],
                                epilog=doc[doc.find("Deterministic choices"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a CelebA folder (official or torchvision layout; images as img_align_celeba/ "
                                  "or img_align_celeba.zip) or hf:PATH_OR_NAME")
    p.add_argument("out_dir", type=Path, help="output folder: manifest.json and <split>/celeba-<split>-NNNNNN.tar")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=positive_int, default=None,
                      help=f"images per shard (default {DEFAULT_SAMPLES_PER_SHARD})")
    size.add_argument("--max-shard-bytes", type=_byte_size, default=None,
                      help="cap on a shard's size instead, e.g. 100000000 or 100M "
                           "(a lone larger image still gets a shard)")
    p.add_argument("--resize", type=_resize, default=None, metavar="WxH",
                   help="resize every whole image to W x H (bicubic, aspect ratio not kept) and re-encode it")
    p.add_argument("--quality", type=_quality, default=95, help="JPEG quality of re-encoded images (default 95)")
    p.add_argument("--workers", type=positive_int, default=default_workers(), help="image-decoding processes")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="pack N images in all, each split keeping its share, chosen by --seed (see below)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad rows and missing or corrupt images (listed in the manifest) instead of failing")
    p.add_argument("--split-ratios", type=_ratios, default=None, metavar="TRAIN,VAL,TEST",
                   help="for sources without a partition (default 0.8,0.1,0.1)")
    p.add_argument("--resplit", type=_ratios, default=None, metavar="TRAIN,VAL,TEST",
                   help="ignore the source's own partition and generate one with these ratios, seeded by --seed "
                        "and stratified by --stratify (see below; not comparable with official-split results)")
    p.add_argument("--stratify", type=_names, default=None, metavar="ATTR,...",
                   help="attributes the generated split keeps balanced (default Male; 'none' for none)")
    p.add_argument("--attributes", default=None, metavar="NAMES",
                   help="attributes to pack, comma-separated, or 'all' / 'drawn' (default: the 40 CelebA ones)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated split and of --limit (default 0)")
    p.add_argument("--image-column", default=None, help="hf: the image column, when it cannot be detected")
    p.add_argument("--id-column", default=None, help="hf: the image id / file name column")
    p.add_argument("--identity-column", default=None, help="hf: the person identity column (default: celeb_id)")
    return p


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
    """The :class:`PackOptions` of parsed ``celeba-dist pack`` arguments."""
    try:
        attributes = tuple(resolve_attributes(args.attributes)) if args.attributes is not None else None
    except ValueError as e:
        raise PackError(f"--attributes: {e}") from None
    if attributes == ():
        raise PackError("--attributes: no attribute named")
    return PackOptions(
        samples_per_shard=None if args.max_shard_bytes else (args.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD),
        max_shard_bytes=args.max_shard_bytes, resize=args.resize, quality=args.quality, workers=args.workers,
        limit=args.limit, skip_bad=args.skip_bad, split_ratios=args.split_ratios, resplit=args.resplit,
        stratify=args.stratify, attributes=attributes, seed=args.seed, image_column=args.image_column,
        id_column=args.id_column, identity_column=args.identity_column,
    )


def main(argv: list[str] | None = None) -> int:
    """``celeba-dist pack``: exit status 0 on success, 1 on any error (printed to stderr)."""
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        pack(args.source, args.out_dir, options_from_args(args))
    except (SourceError, PackError, ManifestError, WorkerDiedError) as e:
        print(f"celeba-dist pack: error: {e}", file=sys.stderr)
        return 1
    except DiskFullError as e:
        print(f"celeba-dist pack: error: {e}; finished shards are kept: free space and run the same "
              "command again to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("celeba-dist pack: interrupted; finished shards are kept, run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0


def build_verify_parser() -> argparse.ArgumentParser:
    """The parser of ``celeba-dist verify``."""
    p = argparse.ArgumentParser(prog="celeba-dist verify", description="Check packed shards against their manifest: "
                                "files, sizes, sha256, sample counts, keys, every image decodes, every label list.")
    p.add_argument("out_dir", type=Path, help="a folder written by celeba-dist pack")
    p.add_argument("--workers", type=positive_int, default=default_workers(), help="processes checking shards")
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


def _setup_logging() -> None:
    from celeba_dist.logs import setup_logging

    setup_logging()


# -- packing ------------------------------------------------------------------------------------

def pack(source: str, out_dir: Path, options: PackOptions) -> dict[str, Any]:
    """Pack ``source`` into ``out_dir`` (resuming a previous run of the same plan); return the manifest."""
    started = time.monotonic()
    data = open_source(source, attributes=list(options.attributes) if options.attributes else None,
                       skip_bad=options.skip_bad, image_column=options.image_column, id_column=options.id_column,
                       identity_column=options.identity_column)
    plan = make_plan(data, options)
    log.info("%s (%s): %s", source, data.kind, ", ".join(f"{s} {len(plan.rows[s])}" for s in SPLITS))
    with locked_out_dir(out_dir):  # one pack per output folder
        progress = open_out_dir(out_dir, data, options, plan.fingerprint(data, options))
        segments = plan_segments(plan, progress, out_dir)
        written_from = time.monotonic()
        if segments:
            create_out_dir(out_dir)
            write_segments(data, plan, options, segments, progress, out_dir)
        else:
            log.info("%s: every shard is already there", out_dir)
        manifest = build_manifest(data, plan, options, progress)
        write_manifest_if_changed(out_dir, manifest)
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
    with signals.stop_requests() as stops, encoded_images(encoder, locators, workers=options.workers) as results, \
            tqdm(total=total, unit="img", desc="pack", file=sys.stderr, disable=None, smoothing=0.05) as bar:
        for seg in segments:
            write_segment(data, plan, options, seg, _counted(results, bar, stops), progress, out_dir)


def _counted(results: Iterator[Encoded], bar: tqdm, stops: signals.StopRequests) -> Iterator[Encoded]:
    """The results, counted on the progress bar, until a stop signal (which may have killed the workers too)."""
    try:
        for result in results:
            if stops.requested():
                break
            bar.update(1)
            yield result
    except WorkerDiedError:
        if not stops.requested():
            raise
    if stops.requested():
        raise PackError(f"stopped by signal {stops.received}; finished shards are kept, "
                        "run the same command again to resume")


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
            sample = make_sample(data, plan.columns, row, encoded.jpg)
            size = sample_member_bytes(sample)
            if writer is not None and not seg.rebuild and writer.full(
                    size, max_samples=options.samples_per_shard, max_bytes=options.max_shard_bytes):
                progress.record(seg.split, index, writer.close(stop=pos))
                writer, index = None, index + 1
            if writer is None:
                start = seg.start if index == seg.first_index else pos
                writer, pending = ShardWriter(out_dir, seg.split, index, start=start, skipped=pending), []
            writer.add(sample, size, size=encoded.size, converted=encoded.converted)
        if writer is None and seg.stop > seg.start:  # every image of the segment was bad: an empty shard
            writer = ShardWriter(out_dir, seg.split, index, start=seg.start, skipped=pending)
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
