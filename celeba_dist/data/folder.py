"""A folder of image files (searched recursively, in sorted order) as batches, for ``celeba-dist predict``."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from celeba_dist.data.streams import Batch, SampleIssues
from celeba_dist.shards.layout import IMAGE_SUFFIXES


class ImageFolderStream(IterableDataset):
    """Batches of (uint8 images, dummy labels, ids) from image files, split across loader workers."""

    def __init__(self, files: list[Path], transform, *, batch_size: int, num_attributes: int):
        super().__init__()
        self.files, self.transform = files, transform
        self.batch_size, self.num_attributes = batch_size, num_attributes

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = self.files[worker::workers]
        for start in range(0, len(mine), self.batch_size):
            chunk = mine[start: start + self.batch_size]
            images = []
            for path in chunk:
                try:
                    images.append(self.transform(path.read_bytes(), random.Random(0)))  # eval: no randomness
                except Exception as exc:
                    raise RuntimeError(f"cannot read image {path}: {exc}") from exc
            yield Batch(torch.stack(images), torch.zeros(len(chunk), self.num_attributes), [p.stem for p in chunk],
                        SampleIssues())


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return files
