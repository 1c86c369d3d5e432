"""``celeba-dist eval``: re-evaluate any checkpoint on a split, on one or many processes.

Uses the checkpoint's own config (model, transform, attributes, thresholds); ``--data`` and
``--set`` may change where the shards are and how they are read. Works unchanged under
``accelerate launch`` and ``torchrun``; the counts are exact whatever the world size.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path


from celeba_dist.cli_args import out_file, report_error
from celeba_dist.config import ConfigError, add_set_argument, config_from_tree
from celeba_dist.data.streams import ShardData, owned_workers
from celeba_dist.diskio import write_json
from celeba_dist.logs import setup_logging
from celeba_dist.shards.manifest import ManifestError
from celeba_dist.train.build import build_model_for, check_data, eval_loader
from celeba_dist.train.ema import selected_weights
from celeba_dist.train.checkpoint import BEST, load_checkpoint
from celeba_dist.train.distributed import build_accelerator, leave_process_group
from celeba_dist.train.engine import evaluate, split_metrics
from celeba_dist.train.losses import LOSSES
from celeba_dist.train.metrics import format_table

log = logging.getLogger("celeba_dist.evaluate")  # not __name__: this module also runs as __main__


def checkpoint_path(run: str | None, checkpoint: str | None) -> Path:
    if checkpoint:
        return Path(checkpoint)
    path = Path(run) / "checkpoints" / BEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run has no best checkpoint yet")
    return path


def evaluate_checkpoint(path: Path, *, split: str, data_dir: str | None, overrides: list[str]) -> dict:
    """Metrics of the checkpoint at ``path`` on ``split`` (every rank returns them)."""
    ckpt = load_checkpoint(path)
    cfg = config_from_tree(ckpt["config"], ["model.pretrained=none", "run.resume=none", *overrides],
                           data_dir=data_dir)  # the weights come from the checkpoint
    accelerator = build_accelerator(precision=cfg.train.precision,
                                    collective_timeout_min=cfg.train.collective_timeout_min)
    setup_logging(rank=accelerator.process_index, is_main=accelerator.is_main_process)
    data = ShardData(cfg.data.root, ckpt["attributes"])
    if not data.split(split).num_samples:  # metrics of nothing would read as accuracy 0
        leave_process_group(accelerator)
        raise ConfigError(f"--split {split}: the shards in {data.root} hold no {split} samples (their manifest "
                          "lists 0); evaluate another split")
    check_data(cfg, data, accelerator, (split,))
    model = build_model_for(cfg, len(data.attributes)).to(accelerator.device)
    model.load_state_dict(selected_weights(ckpt))  # the EMA where validation chose it
    with owned_workers():
        preds = evaluate(model, eval_loader(cfg, data, split, accelerator), accelerator=accelerator, cfg=cfg,
                         to_prob=LOSSES[cfg.loss.name].to_prob, expected=data.split(split).num_samples,
                         split=split, num_attributes=len(data.attributes))
    metrics = split_metrics(preds, data.attributes, ckpt.get("thresholds"))
    metrics["checkpoint"], metrics["split"] = str(path), split
    metrics["world_size"] = accelerator.num_processes
    leave_process_group(accelerator)  # the rank and world size stay readable afterwards
    return metrics if accelerator.is_main_process else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="celeba-dist eval", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run directory (uses checkpoints/best.pt)")
    source.add_argument("--checkpoint", help="a checkpoint file")
    parser.add_argument("--data", help="shards folder (default: the one the run trained on)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--out", type=out_file,
                        help="write the metrics as JSON here (default RUN/eval_<split>.json with --run)")
    add_set_argument(parser, "e.g. data.num_workers=4")
    args = parser.parse_args(argv)
    try:
        path = checkpoint_path(args.run, args.checkpoint)
        metrics = evaluate_checkpoint(path, split=args.split, data_dir=args.data, overrides=args.set)
    except (ConfigError, ManifestError, FileNotFoundError, RuntimeError, ValueError) as exc:
        return report_error("celeba-dist eval", exc)
    if metrics:
        print(format_table(metrics, title=f"{args.split}: {path}"))
        out = args.out or (Path(args.run) / f"eval_{args.split}.json" if args.run else None)
        if out:
            try:
                write_json(out, metrics)
            except OSError as exc:  # --out was checked up front; this is the disk, or a race
                return report_error("celeba-dist eval", OSError(f"cannot write the metrics to {out}: {exc}"))
            print(f"metrics written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
