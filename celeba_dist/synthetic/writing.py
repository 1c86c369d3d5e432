"""Writing a synthetic CelebA into a folder: the images (in worker processes), then the text files;
a folder that already holds a different CelebA, or any image other than this run's own drawing, is
refused before anything is written. One synth per folder: the folder is held with the run lock
(:mod:`celeba_dist.runlock`) while it is written."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

from celeba_dist import runlock
from celeba_dist.diskio import missing_folders, remove_empty, unfinished_writes, write_bytes
from celeba_dist.synthetic.drawing import render_face
from celeba_dist.synthetic.formats import (
    ANNOTATION_FILES, ATTR_FILE, BBOX_FILE, IMAGE_DIR, LANDMARKS_FILE, MAX_IMAGES, annotation_files,
)
from celeba_dist.synthetic.labels import Labels, sample_face
from celeba_dist.workers import ordered_map, process_pool

log = logging.getLogger(__package__)  # the package's name, as in the log lines before the split

_IMAGE_NAME = re.compile(r"\d{6}\.jpg")


class DifferentCelebAError(FileExistsError):
    """OUT_DIR already holds a CelebA that this run would not reproduce byte for byte."""


def _first_line(path: Path) -> str:
    with path.open("rb") as handle:
        return handle.readline().decode("ascii", "replace").strip()


def _check_arguments(*, num_images: int, seed: int, workers: int) -> None:
    if not 1 <= num_images <= MAX_IMAGES:
        raise ValueError(f"num_images must be in 1..{MAX_IMAGES}, got {num_images}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")


def _refuse_a_file(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")


def _refuse_different_celeba(out: Path, *, seed: int, num_images: int) -> None:
    """Raise unless ``out`` is empty or holds exactly what this run would write (or part of it)."""
    if any((out / name).exists() for name in ANNOTATION_FILES):  # a regeneration? compare before drawing
        expected = annotation_files([sample_face(seed, i, num_images).labels for i in range(num_images)])
        _refuse_different_annotations(out, expected, num_images)
    _refuse_stray_images(out / IMAGE_DIR, num_images)


def _refuse_different_annotations(out_dir: Path, files: dict[str, bytes], num_images: int) -> None:
    """Raise unless every annotation file already in ``out_dir`` equals what this run writes."""
    for name in sorted(files, key=lambda n: n != ATTR_FILE):  # the attribute file first: it has the count
        path = out_dir / name
        if path.exists() and path.read_bytes() != files[name]:
            held = f"{_first_line(path)} images" if name in (ATTR_FILE, BBOX_FILE, LANDMARKS_FILE) else "other rows"
            raise DifferentCelebAError(
                f"{out_dir} already holds a different CelebA: its {name} lists {held}, not the "
                f"{num_images} images of this run (or other values); use an empty OUT_DIR or remove the old one"
            )


def _refuse_stray_images(image_dir: Path, num_images: int) -> None:
    """Raise if ``image_dir`` holds JPEGs this run would not write (the rest of another set)."""
    if not image_dir.is_dir():
        return
    stray = sorted(entry.name for entry in os.scandir(image_dir)
                   if entry.name.endswith(".jpg") and not _has_own_name(entry.name, num_images))
    if stray:
        raise DifferentCelebAError(
            f"{image_dir} holds {len(stray)} image(s) this run would not write (e.g. {stray[0]}); "
            "use an empty OUT_DIR or remove the old one"
        )


def _has_own_name(name: str, num_images: int) -> bool:
    stem = name[:-4]
    return len(stem) == 6 and stem.isdigit() and 1 <= int(stem) <= num_images


def _refuse_foreign_images(pool: ProcessPoolExecutor | None, image_dir: Path, *, seed: int, num_images: int,
                           chunk: int) -> None:
    """Raise unless every image already in ``image_dir`` is, byte for byte, the one this run draws.

    A name alone proves nothing: ``000001.jpg`` may be the user's photo. Only a file equal to this
    seed's drawing (left by a finished or interrupted run with the same arguments) is this run's own;
    anything else is refused before a single file is written.
    """
    present = {entry.name for entry in os.scandir(image_dir)} if image_dir.is_dir() else set()
    existing = [i for i in range(num_images) if f"{i + 1:06d}.jpg" in present]
    same = functools.partial(_is_drawn_image, seed, num_images, str(image_dir))
    for index, equal in zip(existing, ordered_map(pool, same, existing, chunksize=chunk)):
        if not equal:
            raise DifferentCelebAError(
                f"{image_dir / f'{index + 1:06d}.jpg'} is not the image this run draws (seed {seed}, "
                f"{num_images} images, this Pillow build), so no interrupted run with these arguments left it; "
                "use an empty OUT_DIR or remove the old one"
            )


def _is_drawn_image(seed: int, num_images: int, image_dir: str, index: int) -> bool:
    """Worker: does image ``index`` in ``image_dir`` hold exactly what this seed draws for it?"""
    face = sample_face(seed, index, num_images)
    return Path(image_dir, face.labels.filename).read_bytes() == render_face(face, seed=seed)


def _draw_image(seed: int, num_images: int, image_dir: str, index: int) -> Labels:
    """Worker: write image ``index`` into ``image_dir`` (unless :func:`_refuse_foreign_images` found it there
    already, identical); returns its labels."""
    face = sample_face(seed, index, num_images)
    path = Path(image_dir, face.labels.filename)
    if not path.exists():
        write_bytes(path, render_face(face, seed=seed))
    return face.labels


def _render_all(pool: ProcessPoolExecutor | None, image_dir: Path, *, seed: int, num_images: int,
                chunk: int) -> list[Labels]:
    """Render every image (in ``pool``'s workers, or here when None); returns the labels by index."""
    report_every = max(5000, num_images // 10)
    draw = functools.partial(_draw_image, seed, num_images, str(image_dir))
    done: list[Labels] = []
    for labels in ordered_map(pool, draw, range(num_images), chunksize=chunk):
        done.append(labels)
        if len(done) % report_every == 0:
            log.info("rendered %d/%d images", len(done), num_images)
    return done


def make_synthetic_celeba(out_dir: str | os.PathLike[str], *, num_images: int, seed: int = 0,
                          workers: int = 1) -> Path:
    """Write a synthetic CelebA of ``num_images`` images into ``out_dir``; returns ``out_dir``.

    Re-running with the same arguments keeps the images already drawn (each checked byte for byte) and
    draws the rest. Raises :class:`DifferentCelebAError`, having written nothing, if ``out_dir`` already
    holds other CelebA annotation files or images (any not equal to this run's), ``ValueError`` on bad
    arguments, :class:`~celeba_dist.runlock.RunLockedError` naming the holder while another live synth
    writes into ``out_dir``. Images come first; the text files follow, each written to a temporary name and
    renamed, ``list_attr_celeba.txt`` last, so an interrupted run never leaves a half-written text file.
    """
    _check_arguments(num_images=num_images, seed=seed, workers=workers)
    out = Path(out_dir)
    _refuse_a_file(out)
    with _locked(out):
        _refuse_different_celeba(out, seed=seed, num_images=num_images)
        chunk = max(8, min(256, math.ceil(num_images / (workers * 8))))
        with process_pool(min(workers, math.ceil(num_images / chunk))) as pool:
            _refuse_foreign_images(pool, out / IMAGE_DIR, seed=seed, num_images=num_images, chunk=chunk)
            _clear_temporaries(out)  # last: a refused folder is left exactly as it was
            (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
            labels = _render_all(pool, out / IMAGE_DIR, seed=seed, num_images=num_images, chunk=chunk)
        for name, data in annotation_files(labels).items():
            write_bytes(out / name, data)
    return out


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One synth per folder: ``out`` (created if missing) is held for the block with the run lock.

    A folder another live synth holds raises :class:`~celeba_dist.runlock.RunLockedError` naming it, with
    nothing written; the lock of a synth that died is taken over (see :func:`celeba_dist.runlock.acquire`).
    Folders that did not exist before (``out``, its parents, its image folder) and are still empty at the end
    (the run was refused or failed before its first image) are removed again.
    """
    created = missing_folders(out / IMAGE_DIR)
    try:
        lock = runlock.acquire(out, stale_s=runlock.OUTPUT_LOCK_STALE_S, user=runlock.SYNTH)
        try:
            yield
        finally:
            lock.release()
    finally:
        remove_empty(created)
    if lock.lost.is_set():
        raise runlock.RunLockedError(f"another synth took the lock of {out} over during this one: its files and "
                                     "this run's may be mixed; run the same command again to check every file")


def _clear_temporaries(out: Path) -> None:
    """Remove what a killed synth left under temporary names, and only that: other ``*.tmp`` files are the user's."""
    for tmp in _own_temporaries(out):
        log.info("removing %s, left by an interrupted run", tmp)
        tmp.unlink()


def _own_temporaries(out: Path) -> list[Path]:
    """Unfinished writes (:func:`~celeba_dist.diskio.temp_name`) of the text files and of the images."""
    return [*unfinished_writes(out, of=lambda name: name in ANNOTATION_FILES),
            *unfinished_writes(out / IMAGE_DIR, of=_IMAGE_NAME.fullmatch)]
