"""What a run shows in TensorBoard, written by rank 0 only.

Scalars: ``train/loss``, ``train/lr``, ``train/images_per_s``, ``train/data_wait_fraction``,
``train/gpu_mem_gb`` (GPU only), ``<split>/<metric>`` means and ``<split>_attr/<name>`` accuracies.
Images: ``val/predictions`` (a grid of validation images with predicted/true labels),
``val/attention`` (the attention model's region weights as a heat map) and
``val/attribute_accuracy`` (a bar chart). The hyper-parameters and final metrics go to the
HParams tab so the members of a sweep compare in one table.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from celeba_dist.config import Config
from celeba_dist.diskio import translate_disk_full
from celeba_dist.train.metrics import METRICS

EVENTS_DIR = "tensorboard"


class Board:
    """A SummaryWriter on rank 0 and a no-op everywhere else.

    The writer writes on a thread of its own and re-raises that thread's error at the next call: a
    full disk comes out of the next call as :class:`celeba_dist.diskio.DiskFullError` naming the event file.
    """

    def __init__(self, run_dir: Path | None, *, enabled: bool, purge_step: int | None = None):
        self.writer: SummaryWriter | None = None
        if not enabled or run_dir is None:
            return
        self.events = run_dir / EVENTS_DIR
        with translate_disk_full(self.events):
            self.writer = SummaryWriter(str(self.events), purge_step=purge_step)
        # the file the writer thread appends to (private in tensorboard; the folder otherwise)
        self.events = Path(getattr(self.writer.file_writer.event_writer, "_file_name", self.events))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            with translate_disk_full(self.events):
                for tag, value in values.items():
                    if value is not None and math.isfinite(value):
                        self.writer.add_scalar(tag, value, step)

    def split_metrics(self, split: str, metrics: dict, step: int) -> None:
        if not self.writer:
            return
        self.scalars({f"{split}/{m}": metrics["mean"][m] for m in METRICS}, step)
        self.scalars({f"{split}_attr/{a}": v["accuracy"] for a, v in metrics["attributes"].items()}, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self.writer:
            with translate_disk_full(self.events):
                self.writer.add_image(tag, image, step, dataformats="HWC")

    def hparams(self, cfg: Config, final: dict[str, float]) -> None:
        """Write the HParams summary into this run's own event file."""
        if not self.writer:
            return
        hp = flat_hparams(cfg)
        metric_dict = {f"hparam/{k}": v for k, v in final.items() if v is not None}
        exp, ssi, sei = hparams(hp, metric_dict)
        with translate_disk_full(self.events):
            for summary in (exp, ssi, sei):
                self.writer.file_writer.add_summary(summary)
            for tag, value in metric_dict.items():
                self.writer.add_scalar(tag, value)

    def close(self) -> None:
        if self.writer:
            writer, self.writer = self.writer, None  # closed once, even when closing fails
            with translate_disk_full(self.events):
                writer.close()


def flat_hparams(cfg: Config) -> dict[str, Any]:
    """Dotted config keys → scalar values TensorBoard's HParams plugin accepts."""
    out: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    out[f"{section}.{key}.{sub}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
            elif isinstance(value, (int, float, str, bool)):
                out[f"{section}.{key}"] = value
            else:
                out[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return out


def grid_lines(probs: list[float], targets: list[int], attributes: list[str], *, thresholds: list[float] | None = None,
               max_lines: int = 4) -> list[tuple[str, bool]]:
    """What one image's tile says: first the attributes where prediction and truth disagree (the most
    confidently wrong first), then the most confident positive predictions; (text, right) pairs, wrong
    ones marked ``x``."""
    thresholds = thresholds or [0.5] * len(attributes)
    rows = [(name, p, t, (p >= th) == bool(t), abs(p - th)) for name, p, t, th in zip(attributes, probs, targets, thresholds)]
    wrong = sorted((r for r in rows if not r[3]), key=lambda r: -r[4])
    positive = sorted((r for r in rows if r[3] and r[1] >= thresholds[attributes.index(r[0])]), key=lambda r: -r[1])
    chosen = (wrong + positive)[:max_lines]
    return [(f"{'x' if not ok else '+'} {name[:14]} {p:.2f} (t={t})", ok) for name, p, t, ok, _ in chosen]


def prediction_grid(images: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor, attributes: list[str],
                    *, thresholds: list[float] | None = None, max_images: int = 16, max_lines: int = 4) -> np.ndarray:
    """uint8 images (B, 3, H, W), each with :func:`grid_lines` under it (wrong in red, right in green) and a
    frame: green when every attribute is right, red otherwise."""
    tiles = []
    for i in range(min(max_images, images.shape[0])):
        img = Image.fromarray(images[i].permute(1, 2, 0).cpu().numpy()).resize((128, 128 * images.shape[2] // images.shape[3]))
        canvas = Image.new("RGB", (img.width, img.height + 12 * max_lines), "white")
        canvas.paste(img, (0, 0))
        draw = ImageDraw.Draw(canvas)
        lines = grid_lines(probs[i].tolist(), [int(t) for t in targets[i].tolist()], attributes,
                           thresholds=thresholds, max_lines=max_lines)
        for j, (text, ok) in enumerate(lines):
            draw.text((2, img.height + 12 * j), text, fill=(0, 110, 0) if ok else (200, 0, 0))
        right = all(ok for _, ok in grid_lines(probs[i].tolist(), [int(t) for t in targets[i].tolist()], attributes,
                                               thresholds=thresholds, max_lines=len(attributes)))
        draw.rectangle([0, 0, img.width - 1, img.height - 1], outline=(0, 180, 0) if right else (220, 0, 0), width=3)
        tiles.append(np.asarray(canvas))
    return _grid(tiles)


def attention_overlay(images: torch.Tensor, attention: torch.Tensor, *, max_images: int = 16) -> np.ndarray:
    """Attention (B, heads, R, R) → how much each region is attended to, as a red heat map."""
    b, _, regions, _ = attention.shape
    side = int(math.isqrt(regions))
    weight = attention.float().mean(dim=(1, 2))[:, : side * side].reshape(b, 1, side, side)  # (B, 1, s, s)
    weight = weight / weight.amax(dim=(2, 3), keepdim=True).clamp(min=1e-12)
    heat = F.interpolate(weight, size=images.shape[2:], mode="bilinear", align_corners=False)
    base = images.float().cpu() / 255.0
    red = torch.zeros_like(base)
    red[:, 0] = 1.0
    mixed = (base * (1 - 0.6 * heat.cpu()) + red * 0.6 * heat.cpu()).clamp(0, 1)
    tiles = [(mixed[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8) for i in range(min(max_images, b))]
    return _grid(tiles)


def accuracy_bars(metrics: dict, *, width: int = 520) -> np.ndarray:
    """A horizontal bar per attribute: its accuracy on [0, 1]."""
    names = list(metrics["attributes"])
    row = 14
    img = Image.new("RGB", (width, row * len(names) + 8), "white")
    draw = ImageDraw.Draw(img)
    left, span = 150, width - 210
    for i, name in enumerate(names):
        acc = metrics["attributes"][name]["accuracy"] or 0.0
        y = 4 + i * row
        draw.text((2, y), name[:22], fill=(0, 0, 0))
        draw.rectangle([left, y + 2, left + int(span * acc), y + row - 3], fill=(60, 120, 200))
        draw.text((left + span + 6, y), f"{acc:.3f}", fill=(0, 0, 0))
    return np.asarray(img)


def _grid(tiles: list[np.ndarray], columns: int = 8) -> np.ndarray:
    if not tiles:
        return np.zeros((8, 8, 3), dtype=np.uint8)
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    cols = min(columns, len(tiles))
    out = np.full((rows * (h + 2), cols * (w + 2), 3), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        out[r * (h + 2): r * (h + 2) + tile.shape[0], c * (w + 2): c * (w + 2) + tile.shape[1]] = tile
    return out
