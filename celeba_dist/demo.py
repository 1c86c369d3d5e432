"""``celeba-dist demo``: the whole pipeline on the synthetic CelebA, in a few minutes on a CPU.

Makes the synthetic CelebA if it is missing, packs it into shards, trains the smiling recipe's
model, evaluates it on the test split, prints the per-attribute table and the command that opens
TensorBoard on the run. Every step is skipped when its output is already there, so a second run
only trains (and resumes, if the first was interrupted).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from celeba_dist.cli_args import positive_int, report_error
from celeba_dist.config import add_set_argument, load_config
from celeba_dist.logs import setup_logging
from celeba_dist.shards.manifest import MANIFEST_NAME

log = logging.getLogger("celeba_dist.demo")  # not __name__: this module also runs as __main__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="celeba-dist demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data/synthetic-celeba", help="where the synthetic CelebA goes")
    parser.add_argument("--shards", default="shards/synthetic", help="where its shards go")
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--num-images", type=positive_int, default=4000)
    parser.add_argument("--epochs", type=positive_int, default=12)
    parser.add_argument("--workers", type=positive_int, default=2, help="processes for making and packing the data")
    add_set_argument(parser, "training overrides")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return _run(args)
    except Exception as exc:  # one line, as every command reports its errors
        return report_error("celeba-dist demo", exc)


def _run(args: argparse.Namespace) -> int:
    from celeba_dist.pack.cli import main as pack_main
    from celeba_dist.synthetic import make_synthetic_celeba
    from celeba_dist.train.main import EXIT_PREEMPTED, STOPPED, main as train_main

    data_dir, shards = Path(args.data_dir), Path(args.shards)
    # The smiling recipe's model on every attribute the synthetic faces really show; no dropout and a
    # cosine schedule get it there in a few epochs. Built first: a bad --set fails before minutes of data.
    cfg = load_config("smiling_simple_cnn", [f"train.epochs={args.epochs}", "data.attributes=drawn",
                                             "model.dropout=0.0", "optim.lr=0.003", "sched.name=cosine",
                                             "data.num_workers=1", *args.set],
                      data_dir=str(shards), run_dir=args.run_dir)
    if not (data_dir / "list_attr_celeba.txt").is_file():
        log.info("making %d synthetic CelebA images in %s", args.num_images, data_dir)
        make_synthetic_celeba(data_dir, num_images=args.num_images, seed=0, workers=args.workers)
    if not (shards / MANIFEST_NAME).is_file():
        log.info("packing %s into %s", data_dir, shards)
        if pack_main([str(data_dir), str(shards), "--workers", str(args.workers)]) != 0:
            return 1
    result = train_main(cfg)
    if result["status"] in STOPPED.values():  # a signal or Ctrl-C, after its checkpoint
        log.warning("training %s after a checkpoint: run the same command again to resume", result["status"])
        return EXIT_PREEMPTED
    if result["status"] != "completed":
        log.error("training ended with status %s", result["status"])
        return 1
    print(f"\nRun folder: {cfg.run_dir}\nOpen TensorBoard with:  tensorboard --logdir {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
