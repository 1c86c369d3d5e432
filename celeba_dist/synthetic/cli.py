"""``celeba-dist synth OUT_DIR --num-images N [--seed S] [--workers W]``."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from celeba_dist.cli_args import int_at_least, positive_int
from celeba_dist.runlock import RunLockedError
from celeba_dist.synthetic.formats import MAX_IMAGES
from celeba_dist.synthetic.writing import make_synthetic_celeba
from celeba_dist.workers import WorkerDiedError

log = logging.getLogger(__package__)  # the package's name, as in the log lines before the split


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``celeba-dist synth``; every number is checked here, before anything is drawn."""
    parser = argparse.ArgumentParser(
        prog="celeba-dist synth",
        description="Write a synthetic CelebA (drawn faces) in the exact official file layout.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path,
                        help="folder to write (laid out like the official release)")
    parser.add_argument("--num-images", metavar="N", type=positive_int, required=True,
                        help=f"how many images (1..{MAX_IMAGES})")
    parser.add_argument("--seed", metavar="S", type=int_at_least(0), default=0,
                        help="same seed, same bytes (default 0)")
    parser.add_argument("--workers", metavar="W", type=positive_int, default=1,
                        help="processes drawing images (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``celeba-dist synth OUT_DIR --num-images N [--seed S] [--workers W]``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
    start = time.perf_counter()
    try:
        out = make_synthetic_celeba(args.out_dir, num_images=args.num_images, seed=args.seed, workers=args.workers)
    except (ValueError, OSError, WorkerDiedError, RunLockedError) as error:  # DifferentCelebAError is an OSError
        log.error("%s", error)
        return 1
    seconds = time.perf_counter() - start
    log.info("wrote %d images to %s in %.1f s (%.0f images/s)", args.num_images, out, seconds,
             args.num_images / seconds)
    return 0
