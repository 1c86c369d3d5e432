"""Writing a synthetic CelebA into a folder: the images (in worker processes), then the text files;
a folder that already holds a different CelebA is refused before anything is drawn."""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from celeba_dist.diskio import write_bytes
from celeba_dist.synthetic.drawing import render_face
from celeba_dist.synthetic.formats import (
    ANNOTATION_FILES, ATTR_FILE, BBOX_FILE, IMAGE_DIR, LANDMARKS_FILE, MAX_IMAGES, annotation_files,
)
from celeba_dist.synthetic.labels import Labels, sample_face

log = logging.getLogger(__package__)  # the package's name, as in the log lines before the split


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


def _refuse_different_celeba(out: Path, *, seed: int, num_images: int) -> None:
    """Raise unless ``out`` is absent, empty, or holds exactly what this run would write (or part of it)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
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
    """Raise if ``image_dir`` holds JPEGs this run would not overwrite (the rest of another set)."""
    if not image_dir.is_dir():
        return
    stray = sorted(entry.name for entry in os.scandir(image_dir)
                   if entry.name.endswith(".jpg") and not _is_own_image(entry.name, num_images))
    if stray:
        raise DifferentCelebAError(
            f"{image_dir} holds {len(stray)} image(s) this run would not write (e.g. {stray[0]}); "
            "use an empty OUT_DIR or remove the old one"
        )


def _is_own_image(name: str, num_images: int) -> bool:
    stem = name[:-4]
    return len(stem) == 6 and stem.isdigit() and 1 <= int(stem) <= num_images


def _render_range(job: tuple[int, int, int, int, str]) -> list[Labels]:
    """Worker: render images ``start..stop-1`` into ``image_dir``; returns their labels."""
    seed, num_images, start, stop, image_dir = job
    labels = []
    for index in range(start, stop):
        face = sample_face(seed, index, num_images)
        write_bytes(Path(image_dir, face.labels.filename), render_face(face, seed=seed))
        labels.append(face.labels)
    return labels


def _process_context() -> multiprocessing.context.BaseContext:
    """fork where the platform has it: no re-import of the caller's ``__main__`` (a script without
    a main guard works) and no start-up cost; the workers only run numpy and PIL code."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _render_all(image_dir: Path, *, seed: int, num_images: int, workers: int) -> list[Labels]:
    """Render every image (in worker processes if ``workers > 1``); returns the labels by index."""
    chunk = max(8, min(256, math.ceil(num_images / (workers * 8))))
    jobs = [(seed, num_images, s, min(s + chunk, num_images), str(image_dir)) for s in range(0, num_images, chunk)]
    report_every = max(5000, num_images // 10)
    done: list[Labels] = []

    def collect(labels: list[Labels]) -> None:
        done.extend(labels)
        if len(done) // report_every != (len(done) - len(labels)) // report_every:
            log.info("rendered %d/%d images", len(done), num_images)

    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            collect(_render_range(job))
    else:  # an executor, not a Pool: a worker that dies raises BrokenProcessPool instead of hanging
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=_process_context()) as pool:
            for future in as_completed([pool.submit(_render_range, job) for job in jobs]):
                collect(future.result())
    return sorted(done, key=lambda labels: labels.index)


def make_synthetic_celeba(out_dir: str | os.PathLike[str], *, num_images: int, seed: int = 0,
                          workers: int = 1) -> Path:
    """Write a synthetic CelebA of ``num_images`` images into ``out_dir``; returns ``out_dir``.

    Re-running with the same arguments rewrites identical files. Raises :class:`DifferentCelebAError`
    if ``out_dir`` already holds other CelebA annotation files or images, ``ValueError`` on bad
    arguments. Images come first; the text files follow, each written to a temporary name and renamed,
    ``list_attr_celeba.txt`` last, so an interrupted run never leaves a half-written text file.
    """
    _check_arguments(num_images=num_images, seed=seed, workers=workers)
    out = Path(out_dir)
    _refuse_different_celeba(out, seed=seed, num_images=num_images)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    labels = _render_all(out / IMAGE_DIR, seed=seed, num_images=num_images, workers=workers)
    for name, data in annotation_files(labels).items():
        write_bytes(out / name, data)
    return out

