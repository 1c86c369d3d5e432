"""``celeba-dist predict``: one CSV row per image (id, 0/1 decision and probability per attribute).

Input is a folder of images (searched recursively, in sorted order) or a packed shards folder
(every split, or ``--split``). Rows are streamed to a temporary file and renamed at the end, so
any number of images fits in memory and an interrupted run leaves no half CSV behind.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Iterator

import torch

from celeba_dist.cli_args import report_error
from celeba_dist.config import Config, ConfigError, add_set_argument
from celeba_dist.data.folder import ImageFolderStream, image_files
from celeba_dist.data.streams import IssueTally, ShardData, eval_stream, make_loader, owned_workers
from celeba_dist.data.transforms import build_transform
from celeba_dist.diskio import atomic_write
from celeba_dist.shards.manifest import MANIFEST_NAME, ManifestError
from celeba_dist.export.loading import build_classifier, read_trained
from celeba_dist.train.engine import prepare_batch

def batches(cfg: Config, source: Path, attributes: list[str], split: str | None, batch_size: int) -> Iterator:
    transform = build_transform(cfg.data.transform, image_size=cfg.data.image_size, train=False)
    if (source / MANIFEST_NAME).is_file():
        data = ShardData(str(source), "all")  # the shards' own labels are read but not used
        for name in [split] if split else ["train", "val", "test"]:
            stream = eval_stream(data, name, transform, batch_size=batch_size, rank=0, world_size=1,
                                 skip_bad=cfg.data.skip_bad_samples)
            yield from make_loader(stream, num_workers=cfg.data.num_workers)
    else:
        stream = ImageFolderStream(image_files(source), transform, batch_size=batch_size,
                                   num_attributes=len(attributes))
        yield from make_loader(stream, num_workers=cfg.data.num_workers)


@torch.no_grad()
def predict(model_source: Path, source: Path, out: Path, *, split: str | None = None, batch_size: int = 0,
            overrides: list[str] = ()) -> int:
    """Write predictions for every image of ``source`` to ``out``; returns the row count. ``model_source``
    is a checkpoint, a run folder or an export folder (:func:`celeba_dist.load`'s sources)."""
    trained = read_trained(model_source, overrides)
    cfg, attributes = trained.cfg, trained.attributes
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_classifier(trained).to(device)
    rows, tally = 0, IssueTally(f"predict {source}")
    with owned_workers(), atomic_write(out, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", *attributes, *[f"{a}_prob" for a in attributes]])
        for images, labels, keys, issues in batches(cfg, source, attributes, split, batch_size or cfg.data.batch_size):
            tally.add(issues)
            if not keys:
                continue
            x, _ = prepare_batch(images, labels, device=device, normalize=cfg.data.normalize,
                                 channels_last=cfg.train.channels_last)
            probs = model(x)
            decisions = model.decide(probs).cpu()
            for key, d, p in zip(keys, decisions.tolist(), probs.cpu().tolist()):
                writer.writerow([key, *d, *[f"{v:.6f}" for v in p]])
            rows += len(keys)
    tally.log_summary()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="celeba-dist predict", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a checkpoint file, or a run folder (its best.pt)")
    which.add_argument("--model", help="an export folder (celeba-dist export), a run folder or a checkpoint")
    parser.add_argument("--input", required=True, help="a folder of images, or a packed shards folder")
    parser.add_argument("--out", required=True, help="the CSV to write")
    parser.add_argument("--split", choices=["train", "val", "test"], help="shards input: only this split")
    parser.add_argument("--batch-size", type=int, default=0)
    add_set_argument(parser, "e.g. data.num_workers=4")
    args = parser.parse_args(argv)
    try:
        rows = predict(Path(args.checkpoint or args.model), Path(args.input), Path(args.out), split=args.split,
                       batch_size=args.batch_size, overrides=args.set)
    except (ConfigError, ManifestError, FileNotFoundError, RuntimeError, ValueError) as exc:
        return report_error("celeba-dist predict", exc)
    print(f"wrote {rows} predictions to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
