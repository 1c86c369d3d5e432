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
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import simplejpeg
import torch
from PIL import Image

from celeba_dist.attributes import ALIGNED_IMAGE_SIZE

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


_DAMAGE = threading.local()


def collect_jpeg_damage() -> tuple[list[str], list[str] | None]:
    """From now on, :func:`decode_rgb` on this thread appends its libjpeg warnings to the returned list
    instead of issuing :class:`JpegWarning`, until :func:`stop_collecting_jpeg_damage` is given the
    second value back (a list append per sample costs nothing next to a ``warnings.catch_warnings``)."""
    previous = getattr(_DAMAGE, "notes", None)
    _DAMAGE.notes = notes = []
    return notes, previous


def stop_collecting_jpeg_damage(previous: list[str] | None) -> None:
    _DAMAGE.notes = previous


def decode_rgb(data: bytes, *, min_size: tuple[int, int] = (0, 0)) -> Image.Image:
    """Image bytes → RGB PIL image, no smaller than ``min_size`` (W, H) where the source allows.

    JPEGs go through libjpeg-turbo (simplejpeg), which decodes straight to the smallest DCT
    scale n/8 that still covers ``min_size`` (3/8 of 178×218 for a 64×64 model); other formats
    and colour spaces libjpeg-turbo cannot convert (CMYK) fall back to PIL; 16-bit grey (PNG, TIFF) is
    scaled to 8 bits, 65535 → 255, where PIL's own conversion would turn it white. A JPEG that decodes
    only with libjpeg's warnings (damaged data it can work around) issues a :class:`JpegWarning`
    (or, while :func:`collect_jpeg_damage` collects, notes it there).
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
                notes = getattr(_DAMAGE, "notes", None)
                if notes is None:
                    warnings.warn(JpegWarning(str(strict_error)), stacklevel=2)
                else:
                    notes.append(str(strict_error))
                return Image.fromarray(array)
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG" and min_size != (0, 0):
        img.draft("RGB", min_size)
    if img.mode.startswith("I"):  # 16-bit grey (I;16*, or I from 16-bit PNG/TIFF): convert() clips at 255
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))  # round(v / 257)
    return img if img.mode == "RGB" else img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB → uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _maybe_flip(img: Image.Image, train: bool, rng: random.Random) -> Image.Image:
    if train and rng.random() < 0.5:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


Box = tuple[int, int, int, int]  # (left, top, width, height) in pixels of the decoded image


def _central_square(width: int, height: int) -> Box:
    """The square of the shorter side, centred."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def _celeba_aspect_box(width: int, height: int) -> Box:
    """The central box of CelebA's 178:218 aspect, to the nearest pixel, clipped to the image."""
    src_w, src_h = ALIGNED_IMAGE_SIZE
    box_w = min(width, round(height * src_w / src_h))
    box_h = min(height, round(width * src_h / src_w))
    return (width - box_w) // 2, (height - box_h) // 2, box_w, box_h


def _whole(width: int, height: int) -> Box:
    return 0, 0, width, height


def crop178_resize(*, image_size: tuple[int, int], train: bool) -> Transform:
    """RandomCrop 178 (train) / CenterCrop 178 (eval) → Resize → flip (train): the smiling CNN's input.

    The crop is the square of the shorter side: on aligned CelebA (178×218) the 178×178 square, at a
    random top in 0..40 for training (uniform over the valid positions, drawn from ``rng``) and the
    central one otherwise. Offsets are in the pixels of the decoded image, which libjpeg may have
    decoded at a DCT scale (67×82 for a 64×64 output: a random top in 0..15, steps of 8/3 source
    pixels). The same rule makes shards pre-packed with ``--resize 64x78`` need no resize at load
    time: evaluation takes the central 64×64, training a 64×64 at a random top in 0..14.
    """
    out_h, out_w = image_size
    side_min = max(out_h, out_w)

    def apply(data: bytes, rng: random.Random) -> torch.Tensor:
        img = decode_rgb(data, min_size=(side_min, side_min))
        left, top, side, _ = _central_square(*img.size)
        if train:  # one draw along the longer side (none along the other, which the square fills)
            offset = rng.randint(0, max(img.size) - side)
            left, top = (offset, 0) if img.width > img.height else (0, offset)
        box = (left, top, left + side, top + side)
        if (side, side) == (out_w, out_h):
            img = img.crop(box)
        else:  # crop and resize in one pass
            img = img.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
        return to_tensor(_maybe_flip(img, train, rng))

    return apply


def _celeba_aspect_resize(*, image_size: tuple[int, int]) -> Transform:
    """The central box of CelebA's 178:218 aspect (to the nearest pixel, clipped to the image) → Resize to
    ``image_size`` (H, W): a fixed-size image for any input; an aligned CelebA image is resized whole."""
    out_h, out_w = image_size

    def apply(data: bytes, rng: random.Random) -> torch.Tensor:
        img = decode_rgb(data, min_size=(out_w, out_h))
        left, top, box_w, box_h = _celeba_aspect_box(*img.size)
        box = (left, top, left + box_w, top + box_h)
        if (box_w, box_h) == (out_w, out_h):
            img = img.crop(box)
        else:
            img = img.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
        return to_tensor(img)

    return apply


RESIZE_CROP_TO = (270, 220)  # (H, W) the ResNeXt source resizes to before its 178x218 crop


def resize_crop(*, image_size: tuple[int, int], train: bool, resize_to: tuple[int, int] = RESIZE_CROP_TO
                ) -> Transform:
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


Resample = Callable[[torch.Tensor], torch.Tensor]  # a decoded image (3, H, W) uint8 → the cached form's


def box_resample(box: Callable[[int, int], Box], size: tuple[int, int], *,
                 then_crop: tuple[int, int] | None = None) -> Resample:
    """A deterministic transform's geometry on a decoded uint8 tensor (3, H, W), on its device: the
    ``box`` of the image resized to ``size`` (H, W), bilinear with antialiasing (as PIL's resize), then
    the central ``then_crop`` (H, W). For ``data.cache_decode=device``, whose images arrive decoded at
    full size where the CPU path decodes at a DCT scale: the pixels differ by that resampling only."""

    def apply(image: torch.Tensor) -> torch.Tensor:
        left, top, width, height = box(image.shape[-1], image.shape[-2])
        if (height, width) == tuple(size):
            out = image[:, top:top + height, left:left + width]
        else:  # torchvision costs its import (torch._dynamo, ~1.5 s a process) only where it is used
            from torchvision.transforms.v2.functional import resized_crop

            out = resized_crop(image, top, left, height, width, list(size), antialias=True)
        if then_crop is not None:
            (h, w), (ch, cw) = out.shape[-2:], then_crop
            out = out[:, (h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
        return out

    return apply


@dataclass(frozen=True)
class CachedForm:
    """A preset split for ``data.cache``: ``base`` (the decode and everything deterministic) runs once
    per sample into the cache, which holds uint8 images of ``size`` (H, W); the random part (a crop to
    ``crop`` (H, W), a horizontal flip) runs on whole batches on the training device (:func:`augment_batch`).
    ``resample`` is ``base`` after the decode, on a decoded tensor (``data.cache_decode=device``)."""

    size: tuple[int, int]
    base: Transform
    crop: tuple[int, int] | None = None
    flip: bool = False
    resample: Resample | None = None


def _cached_crop178(image_size: tuple[int, int]) -> CachedForm:
    """crop178_resize's training transform for ``data.cache``: the image resized to the output's scale
    with CelebA's aspect (64×78 for a 64×64 output) is cached, the random square crop and the flip are
    taken per batch.

    The same crops at the same scale as the streamed path, in the other order: that one crops the
    (DCT-scaled) decoded image and then resizes, this one resizes the whole image and then crops, so
    the pixels differ by interpolation (and the offsets are quantised to the output's pixels, 0..14
    for 64×64, instead of the decoded image's). On shards pre-packed with ``--resize 64x78`` neither
    path resamples and both crop the same 64×64 windows. Images of another aspect than CelebA's are
    cut to its central 178:218 box first, where the streamed path would crop a square of them.
    """
    out_h, out_w = image_size
    cached_h = max(out_h, round(out_h * ALIGNED_IMAGE_SIZE[1] / ALIGNED_IMAGE_SIZE[0]))
    base = _celeba_aspect_resize(image_size=(cached_h, out_w))
    return CachedForm((cached_h, out_w), base, crop=image_size, flip=True,
                      resample=box_resample(_celeba_aspect_box, (cached_h, out_w)))


def _cached_resize_crop(image_size: tuple[int, int]) -> CachedForm:
    big = RESIZE_CROP_TO
    if image_size[0] > big[0] or image_size[1] > big[1]:
        raise ValueError(f"crop {image_size} larger than the resize {big}")
    return CachedForm(big, resize(image_size=big, train=False), crop=image_size, flip=True,
                      resample=box_resample(_whole, big))


def _cached_resize(image_size: tuple[int, int]) -> CachedForm:
    return CachedForm(image_size, resize(image_size=image_size, train=False), flip=True,
                      resample=box_resample(_whole, image_size))


@dataclass(frozen=True)
class Preset:
    build: Callable[..., Transform]
    cached: Callable[[tuple[int, int]], CachedForm]  # the training transform, split for data.cache
    description: str
    eval_resample: Callable[[tuple[int, int]], Resample]  # the evaluation transform after its decode


PRESETS: dict[str, Preset] = {
    "crop178_resize": Preset(crop178_resize, _cached_crop178,
                             "RandomCrop 178 (train) / CenterCrop 178 (eval) -> Resize (64x64) -> flip",
                             lambda size: box_resample(_central_square, size)),
    "resize_crop": Preset(resize_crop, _cached_resize_crop,
                          "Resize 220x270 -> crop 178x218 (random in training) -> flip",
                          lambda size: box_resample(_whole, RESIZE_CROP_TO, then_crop=size)),
    "imagenet": Preset(resize, _cached_resize, "Resize (224x224) -> flip; use with data.normalize=imagenet",
                       lambda size: box_resample(_whole, size)),
}


def build_transform(name: str, *, image_size: tuple[int, int], train: bool) -> Transform:
    """The transform preset ``name`` (see :data:`PRESETS`) for training or evaluation."""
    return _preset(name).build(image_size=tuple(image_size), train=train)


def build_cached_form(name: str, *, image_size: tuple[int, int], train: bool) -> CachedForm:
    """What ``data.cache`` keeps of preset ``name``, and what it does per batch: for training the
    deterministic part and the random crop and flip; for evaluation the whole (deterministic) transform."""
    if train:
        return _preset(name).cached(tuple(image_size))
    return CachedForm(tuple(image_size), build_transform(name, image_size=image_size, train=False),
                      resample=_preset(name).eval_resample(tuple(image_size)))


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown transform {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name]


_MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds), elementwise on int64 tensors of any device."""
    x = x & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def batch_uniforms(sample_seeds: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) floats in [0, 1), a pure function of each sample's seed: the same sample with the same
    seed gets the same draws in any batch, on any rank, on any device."""
    salts = torch.arange(1, count + 1, device=sample_seeds.device, dtype=torch.int64) * 0x9E3779B1
    bits = hash32(sample_seeds.view(-1, 1) ^ salts.view(1, -1))
    return (bits >> 8).float() / float(1 << 24)


def augment_batch(images: torch.Tensor, sample_seeds: torch.Tensor, form: CachedForm) -> torch.Tensor:
    """The random crop and flip of ``form`` on a uint8 batch (B, 3, H, W), in one gather on its device.

    Per sample, a crop offset uniform over the valid positions and a flip with probability 1/2, drawn
    by :func:`batch_uniforms` from ``sample_seeds`` (int64, one per sample).
    """
    if form.crop is None and not form.flip:
        return images
    b, _, h, w = images.shape
    u = batch_uniforms(sample_seeds, 3)
    if form.crop is None:  # a flip alone: no gather needed
        return torch.where((u[:, 2] < 0.5)[:, None, None, None], images.flip(3), images)
    ch, cw = form.crop
    top = (u[:, 0] * (h - ch + 1)).long().clamp_(max=h - ch)
    left = (u[:, 1] * (w - cw + 1)).long().clamp_(max=w - cw)
    rows = top[:, None] + torch.arange(ch, device=images.device)  # (B, ch)
    cols = left[:, None] + torch.arange(cw, device=images.device)  # (B, cw)
    if form.flip:
        cols = torch.where((u[:, 2] < 0.5)[:, None], cols.flip(1), cols)
    picked = images[torch.arange(b, device=images.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2).contiguous()  # advanced indexing put the channels last


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
