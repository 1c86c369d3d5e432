"""``celeba-dist models``: every registered model with its parameter count and default input size."""
from __future__ import annotations

import argparse

import torch

from celeba_dist.models import torchvision_any
from celeba_dist.models.registry import COMMON_TORCHVISION, TORCHVISION_PREFIX, count_parameters, list_models, model_spec
from celeba_dist.models.registry import build_model


def _count_on_meta(name: str, num_attributes: int) -> tuple[int, int]:
    """Parameter counts without allocating or initialising weights (built on the meta device)."""
    with torch.device("meta"):
        return count_parameters(build_model(name, num_attributes=num_attributes))


def list_main(argv: list[str] | None = None) -> int:
    """``celeba-dist models``: every model with its parameter count and default input size."""
    parser = argparse.ArgumentParser(
        prog="celeba-dist models", description="List every model with its parameter count and default input size.",
    )
    parser.add_argument("--num-attributes", type=int, default=40, help="size of the head (default: 40)")
    parser.add_argument(
        "--torchvision", nargs="*", default=list(COMMON_TORCHVISION), metavar="NAME",
        help="torchvision models to count as examples of torchvision:<name>",
    )
    args = parser.parse_args(argv)
    names = list_models() + [TORCHVISION_PREFIX + n for n in args.torchvision]
    rows = [("model", "parameters", "trainable", "input HxW", "ImageNet", "description")]
    for name in names:
        spec = model_spec(name)
        total, trainable = _count_on_meta(name, args.num_attributes)
        h, w = spec.input_size
        rows.append((name, f"{total:,}", f"{trainable:,}", f"{h}x{w}", "yes" if spec.supports_imagenet else "no", spec.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(wd) if i == 0 else cell.rjust(wd) for i, (cell, wd) in enumerate(zip(row, widths))) + "  " + row[-1])
    print(
        f"\nParameter counts are for {args.num_attributes} attributes. Any torchvision classifier works as "
        f"'torchvision:<name>' ({len(torchvision_any.torchvision_names())} names, e.g. "
        f"{', '.join(torchvision_any.torchvision_names()[:6])}, ...); its last classification layer is replaced."
    )
    return 0
