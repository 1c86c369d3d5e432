"""The official CelebA layout: image size and folder, file names, and the five annotation text files."""
from __future__ import annotations

from typing import Iterable, Sequence

from celeba_dist.attributes import ALIGNED_IMAGE_SIZE, CELEBA_ATTRIBUTES
from celeba_dist.synthetic.labels import Labels

IMAGE_WIDTH, IMAGE_HEIGHT = ALIGNED_IMAGE_SIZE
JPEG_QUALITY = 90
IMAGE_DIR = "img_align_celeba"
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IDENTITY_FILE = "identity_CelebA.txt"
BBOX_FILE = "list_bbox_celeba.txt"
LANDMARKS_FILE = "list_landmarks_align_celeba.txt"
ANNOTATION_FILES = (PARTITION_FILE, IDENTITY_FILE, BBOX_FILE, LANDMARKS_FILE, ATTR_FILE)  # write order
LANDMARK_NAMES = (
    "lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
    "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y",
)
MAX_IMAGES = 999_999  # six-digit file names


def _lines(header: Iterable[str], rows: Iterable[str]) -> bytes:
    """CRLF-terminated text, as in every official CelebA file."""
    return "".join(f"{line}\r\n" for lines in (header, rows) for line in lines).encode("ascii")


def annotation_files(faces: Sequence[Labels]) -> dict[str, bytes]:
    """The five official text files for ``faces`` (in index order), ``list_attr_celeba.txt`` last.

    Column spacing follows the official files as published: the first value after the file name
    is unpadded, later values are right-aligned (``000007.jpg 1 -1  1``,
    ``000001.jpg 69  109  106``, ``000001.jpg    95  71 226 313``).
    """
    n = str(len(faces))
    return {
        PARTITION_FILE: _lines((), (f"{f.filename} {f.partition}" for f in faces)),
        IDENTITY_FILE: _lines((), (f"{f.filename} {f.identity}" for f in faces)),
        BBOX_FILE: _lines(
            (n, "image_id x_1 y_1 width height"),
            (f"{f.filename} {f.bbox[0]:5d} {f.bbox[1]:3d} {f.bbox[2]:3d} {f.bbox[3]:3d}" for f in faces),
        ),
        LANDMARKS_FILE: _lines(
            (n, " ".join(LANDMARK_NAMES)),
            (f"{f.filename} {f.landmarks[0]}" + "".join(f" {v:4d}" for v in f.landmarks[1:]) for f in faces),
        ),
        ATTR_FILE: _lines(
            (n, " ".join(CELEBA_ATTRIBUTES) + " "),
            (f"{f.filename} {f.attributes[0]}" + "".join(f" {v:2d}" for v in f.attributes[1:]) for f in faces),
        ),
    }

