"""Decode + per-recipe image transforms, in one place.

Every preset turns the JPEG bytes of one sample (and a ``random.Random`` for its augmentations)
into a ``uint8`` tensor (3, H, W). Conversion
to float and normalisation happen later on whole batches, on the training device
(:func:`normalize_batch`): a uint8 batch is a quarter of the bytes through the loader queues and
the host-to-device copy.

Decoding never runs at full size when the preset needs less: libjpeg-turbo decodes straight to
the smallest DCT scale (n/8) that still covers the target, before cropping and resizing. Random choices come from the ``rng`` argument, which the loader seeds per
sample (see ``celeba_dist.data.streams``), so augmentations are reproducible whatever the worker layout.
(A plain ``random.Random`` on purpose: reseeding torch's global generator per sample also queues
lazy seeding calls for every accelerator backend, which costs more than decoding a small JPEG.)
"""
from __future__ import annotations

import io
import random
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import simplejpeg
import torch
from PIL import Image

Transform = Callable[[bytes, random.Random], torch.Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # x / 255
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}


class JpegWarning(UserWarning):
    """libjpeg decoded a JPEG but reported damage ("Premature end of JPEG file", "Corrupt JPEG data"):
    part of the image may be grey or garbage. Issued by :func:`decode_rgb`; the loader counts them."""


def decode_rgb(data: bytes, *, min_size: tuple[int, int] = (0, 0)) -> Image.Image:
    """Image bytes → RGB PIL image, no smaller than ``min_size`` (W, H) where the source allows.

    JPEGs go through libjpeg-turbo (simplejpeg), which decodes straight to the smallest DCT
    scale n/8 that still covers ``min_size`` (3/8 of 178×218 for a 64×64 model); other formats
    and colour spaces libjpeg-turbo cannot convert (CMYK) fall back to PIL. A JPEG that decodes
    only with libjpeg's warnings (damaged data it can work around) issues a :class:`JpegWarning`.
    Damage libjpeg cannot notice (changed bits in the compressed data) decodes without one: only
    the shard's sha256 (``celeba-dist verify``, ``data.check_shards=sha256``) catches that.
    """
    if data[:2] == b"\xff\xd8":
        size = {"min_width": min_size[0], "min_height": min_size[1]}
        try:
            return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", **size))
        except ValueError as strict_error:
            try:
                array = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=False, **size)
            except ValueError:
                array = None  # not decodable by libjpeg-turbo at all: PIL has the last word
            if array is not None:
                warnings.warn(JpegWarning(str(strict_error)), stacklevel=2)
                return Image.fromarray(array)
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG" and min_size != (0, 0):
        img.draft("RGB", min_size)
    return img if img.mode == "RGB" else img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB → uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _maybe_flip(img: Image.Image, train: bool, rng: random.Random) -> Image.Image:
    if train and rng.random() < 0.5:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def crop178_resize(*, image_size: tuple[int, int], train: bool) -> Transform:
    """CenterCrop 178 → Resize → flip (train): the smiling CNN's input.

    On aligned CelebA (178×218) the 178 crop is the central square of the shorter side; the
    same rule makes shards pre-packed with ``--resize 64x78`` give the same tensors with no
    resize at load time.
    """
    out_h, out_w = image_size
    side_min = max(out_h, out_w)

    def apply(data: bytes, rng: random.Random) -> torch.Tensor:
        img = decode_rgb(data, min_size=(side_min, side_min))
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        box = (left, top, left + side, top + side)
        if (side, side) == (out_w, out_h):
            img = img.crop(box)
        else:  # crop and resize in one pass
            img = img.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
        return to_tensor(_maybe_flip(img, train, rng))

    return apply


def resize_crop(*, image_size: tuple[int, int], train: bool, resize_to: tuple[int, int] = (270, 220)) -> Transform:
    """Resize to 220×270 (W×H) → crop 178×218 (random for training, central otherwise) → flip.

    The ResNeXt-50 source's input pipeline; ``image_size`` is the crop (H, W).
    """
    crop_h, crop_w = image_size
    big_h, big_w = resize_to
    if crop_h > big_h or crop_w > big_w:
        raise ValueError(f"crop {image_size} larger than the resize {resize_to}")

    def apply(data: bytes, rng: random.Random) -> torch.Tensor:
        img = decode_rgb(data, min_size=(big_w, big_h)).resize((big_w, big_h), Image.Resampling.BILINEAR)
        if train:
            top, left = rng.randint(0, big_h - crop_h), rng.randint(0, big_w - crop_w)
        else:
            top, left = (big_h - crop_h) // 2, (big_w - crop_w) // 2
        img = img.crop((left, top, left + crop_w, top + crop_h))
        return to_tensor(_maybe_flip(img, train, rng))

    return apply


def resize(*, image_size: tuple[int, int], train: bool) -> Transform:
    """Resize the whole image to ``image_size`` (H, W) → flip (train): the 224×224 ImageNet input."""
    out_h, out_w = image_size

    def apply(data: bytes, rng: random.Random) -> torch.Tensor:
        img = decode_rgb(data, min_size=(out_w, out_h))
        if img.size != (out_w, out_h):
            img = img.resize((out_w, out_h), Image.Resampling.BILINEAR)
        return to_tensor(_maybe_flip(img, train, rng))

    return apply


@dataclass(frozen=True)
class Preset:
    build: Callable[..., Transform]
    description: str


PRESETS: dict[str, Preset] = {
    "crop178_resize": Preset(crop178_resize, "CenterCrop 178 -> Resize (64x64) -> flip"),
    "resize_crop": Preset(resize_crop, "Resize 220x270 -> crop 178x218 (random in training) -> flip"),
    "imagenet": Preset(resize, "Resize (224x224) -> flip; use with data.normalize=imagenet"),
}


def build_transform(name: str, *, image_size: tuple[int, int], train: bool) -> Transform:
    """The transform preset ``name`` (see :data:`PRESETS`) for training or evaluation."""
    if name not in PRESETS:
        raise ValueError(f"unknown transform {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name].build(image_size=tuple(image_size), train=train)


def normalize_batch(images: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float32, scaled to [0, 1] and normalised with ``name``'s mean/std."""
    if name not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {name!r}; valid: {sorted(NORMALIZATIONS)}")
    mean, std = NORMALIZATIONS[name]
    x = images.float().div_(255.0)
    if name != "unit":
        m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        x = x.sub_(m).div_(s)
    return x
