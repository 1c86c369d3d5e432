"""Image files as batches for ``celeba-dist predict``: a folder (searched recursively, in sorted order)
or one image file, each image under an id that names its file (:func:`image_ids`)."""
from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from celeba_dist.data.streams import Batch, SampleIssues
from celeba_dist.data.transforms import collect_jpeg_damage, stop_collecting_jpeg_damage
from celeba_dist.shards.layout import IMAGE_SUFFIXES


class ImageFolderStream(IterableDataset):
    """Batches of (uint8 images, dummy labels, ids) from (id, file) pairs, split across loader workers.
    A JPEG that decodes only with libjpeg's warnings is reported in the batch's issues under its file's
    name, as a shard's damaged sample is (:class:`celeba_dist.data.streams.IssueTally`)."""

    def __init__(self, images: list[tuple[str, Path]], transform, *, batch_size: int, num_attributes: int):
        super().__init__()
        self.images, self.transform = images, transform
        self.batch_size, self.num_attributes = batch_size, num_attributes

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = self.images[worker::workers]
        for start in range(0, len(mine), self.batch_size):
            yield self._batch(mine[start: start + self.batch_size])

    def _batch(self, chunk: list[tuple[str, Path]]) -> Batch:
        images, issues = [], SampleIssues()
        damage, previous = collect_jpeg_damage()
        try:
            for key, path in chunk:
                known = len(damage)
                try:
                    images.append(self.transform(path.read_bytes(), random.Random(0)))  # eval: no randomness
                except Exception as exc:
                    raise RuntimeError(f"cannot read image {path}: {exc}") from exc
                if len(damage) > known:
                    issues.warned.append((key, f"{path}: {damage[known]}"))
        finally:
            stop_collecting_jpeg_damage(previous)
        return Batch(torch.stack(images), torch.zeros(len(chunk), self.num_attributes), [k for k, _ in chunk], issues)


def find_images(source: Path) -> list[tuple[str, Path]]:
    """(id, file) for every image of ``source``, a folder or one image file, in sorted order."""
    files = image_files(source)
    return list(zip(image_ids(files, source), files))


def image_files(source: Path) -> list[Path]:
    """The image files under ``source`` (or ``source`` itself); a missing input, a file that is not an
    image, a link to nothing where an image should be, or a folder without images is an error naming it."""
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    if source.is_file():
        if source.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{source} is neither a folder nor an image file ({suffixes})")
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"{source} does not exist")
    found = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    dangling = [p for p in found if p.is_symlink() and not p.exists()]
    if dangling:
        more = f" (and {len(dangling) - 1} more)" if len(dangling) > 1 else ""
        raise FileNotFoundError(f"{dangling[0]} is a link to {os.readlink(dangling[0])}, which does not exist{more}")
    files = [p for p in found if p.is_file()]
    if not files:
        raise FileNotFoundError(f"{source}: no images ({suffixes}) found")
    return files


def image_ids(files: list[Path], source: Path) -> list[str]:
    """Each file's id: its name without the extension, as a shard's sample key (CelebA's ``000001``), or,
    where another file would get the same id, its path relative to ``source`` (``good/a.jpg``,
    ``good/sub/a.jpg``, ``good/a.png``). Ids are unique, and each names one file."""
    relative = [p.relative_to(source).as_posix() if p != source else p.name for p in files]
    stems = Counter(p.stem for p in files)
    taken = set(relative)
    return [p.stem if stems[p.stem] == 1 and p.stem not in taken else rel for p, rel in zip(files, relative)]
