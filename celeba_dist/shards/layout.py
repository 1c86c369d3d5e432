"""Names on disk that the packer, the loader and ``verify`` must agree on: the splits, the shard file names,
what counts as an image file, and how tar members group into samples."""
from __future__ import annotations

SPLITS: tuple[str, ...] = ("train", "val", "test")  # also the official partition values 0, 1, 2, in order
SHARD_NAME = "celeba-{split}-{index:06d}.tar"
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def shard_file(split: str, index: int) -> str:
    """The shard's path relative to the shard folder, e.g. ``train/celeba-train-000000.tar``."""
    return f"{split}/{SHARD_NAME.format(split=split, index=index)}"


def split_key(name: str) -> tuple[str, str]:
    """A tar member's (sample key, member suffix): ``a/b/000001.attr.json`` → (``a/b/000001``, ``attr.json``).

    The rule of webdataset's ``base_plus_ext``, with the suffix lower-cased: members whose keys are
    equal and adjacent form one sample.
    """
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()
