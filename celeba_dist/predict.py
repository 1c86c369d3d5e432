"""``celeba-dist predict``: one CSV row per image (id, 0/1 decision and probability per attribute).

Input is a folder of images (searched recursively, in sorted order), one image file, or a packed
shards folder (every split, or ``--split``). Rows are streamed to a temporary file and renamed at the
end, so any number of images fits in memory and an interrupted run leaves no half CSV behind. The
input and ``--out`` are checked before the model loads: a mistake costs no work.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Iterator

import torch

from celeba_dist.cli_args import out_file, positive_int, report_error
from celeba_dist.config import Config, ConfigError, add_set_argument
from celeba_dist.data.folder import ImageFolderStream, find_images
from celeba_dist.data.streams import IssueTally, ShardData, eval_stream, make_loader, owned_workers
from celeba_dist.data.transforms import build_transform
from celeba_dist.diskio import atomic_write
from celeba_dist.shards.manifest import MANIFEST_NAME, ManifestError
from celeba_dist.export.loading import build_classifier, read_trained
from celeba_dist.train.engine import prepare_batch


def folder_images(source: Path, split: str | None) -> list[tuple[str, Path]] | None:
    """The (id, file) pairs of an image folder or file, None for a shards folder (read split by split)."""
    if (source / MANIFEST_NAME).is_file():
        return None
    if not source.exists():
        raise FileNotFoundError(f"--input {source} does not exist")
    if split:
        raise ValueError(f"--split {split} needs a packed shards folder, and {source} is not one "
                         f"(no {MANIFEST_NAME}): drop --split to predict every image")
    return find_images(source)


def batches(cfg: Config, source: Path, images: list[tuple[str, Path]] | None, attributes: list[str],
            split: str | None, batch_size: int) -> Iterator:
    transform = build_transform(cfg.data.transform, image_size=cfg.data.image_size, train=False)
    if images is None:
        data = ShardData(str(source), "all")  # the shards' own labels are read but not used
        for name in [split] if split else ["train", "val", "test"]:
            stream = eval_stream(data, name, transform, batch_size=batch_size, rank=0, world_size=1,
                                 skip_bad=cfg.data.skip_bad_samples)
            yield from make_loader(stream, num_workers=cfg.data.num_workers, timeout_s=cfg.data.loader_timeout_s)
        return
    stream = ImageFolderStream(images, transform, batch_size=batch_size, num_attributes=len(attributes))
    yield from make_loader(stream, num_workers=cfg.data.num_workers, timeout_s=cfg.data.loader_timeout_s)


@torch.no_grad()
def predict(model_source: Path, source: Path, out: Path, *, split: str | None = None, batch_size: int | None = None,
            overrides: list[str] = ()) -> int:
    """Write predictions for every image of ``source`` to ``out``; returns the row count. ``model_source``
    is a checkpoint, a run folder or an export folder (:func:`celeba_dist.load`'s sources)."""
    images = folder_images(source, split)  # before the model loads: a wrong input costs nothing
    trained = read_trained(model_source, overrides)
    cfg, attributes = trained.cfg, trained.attributes
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_classifier(trained).to(device)
    rows, tally = 0, IssueTally(f"predict {source}")
    with owned_workers(), atomic_write(out, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", *attributes, *[f"{a}_prob" for a in attributes]])
        for pixels, labels, keys, issues in batches(cfg, source, images, attributes, split,
                                                    batch_size or cfg.data.batch_size):
            tally.add(issues)
            if not keys:
                continue
            x, _ = prepare_batch(pixels, labels, device=device, normalize=cfg.data.normalize,
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
    parser.add_argument("--input", required=True, help="a folder of images, an image file, or a packed shards folder")
    parser.add_argument("--out", required=True, type=out_file, help="the CSV to write")
    parser.add_argument("--split", choices=["train", "val", "test"], help="shards input: only this split")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: the run's data.batch_size")
    add_set_argument(parser, "e.g. data.num_workers=4")
    args = parser.parse_args(argv)
    try:
        rows = predict(Path(args.checkpoint or args.model), Path(args.input), args.out, split=args.split,
                       batch_size=args.batch_size, overrides=args.set)
    except (ConfigError, ManifestError, FileNotFoundError, RuntimeError, ValueError, OSError) as exc:
        return report_error("celeba-dist predict", exc)
    print(f"wrote {rows} predictions to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
