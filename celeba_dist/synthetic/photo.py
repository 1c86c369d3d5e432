"""Photographing a drawn face: the background behind it, then lighting, pixel noise and JPEG encoding."""
from __future__ import annotations

import functools
import io
import math
import random

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from celeba_dist.synthetic.colors import jitter, mix
from celeba_dist.synthetic.formats import IMAGE_HEIGHT, IMAGE_WIDTH, JPEG_QUALITY

_NOISE_MARGIN = 64
_NOISE_SIGMAS = (2.0, 3.5, 5.0, 7.0)
_DIRECTIONS = 16  # gradient and side-light directions, multiples of 22.5 degrees
_LIGHTS = (0, 12, 24, 36)  # side-light strength: brightness difference between opposite edges
_GRID_Y, _GRID_X = np.mgrid[0:IMAGE_HEIGHT, 0:IMAGE_WIDTH].astype(np.float32)
_GRID_X = _GRID_X / IMAGE_WIDTH - 0.5  # (H, W), -0.5 .. 0.5
_GRID_Y = _GRID_Y / IMAGE_HEIGHT - 0.5


@functools.lru_cache(maxsize=None)
def _ramp(direction: int, amplitude: float, base: int) -> Image.Image:
    """An "L" image ``base + amplitude * t`` where t runs from -0.5 to 0.5 along ``direction``."""
    angle = 2 * math.pi * direction / _DIRECTIONS
    t = _GRID_X * math.cos(angle) + _GRID_Y * math.sin(angle)
    return Image.fromarray(np.rint(base + amplitude * t).clip(0, 255).astype(np.uint8))


def background(rnd: random.Random) -> Image.Image:
    """A two-colour linear gradient in one of 16 directions with a few low-contrast shapes."""
    c1 = [rnd.randrange(256) for _ in range(3)]
    c2 = [rnd.randrange(256) for _ in range(3)]
    t = np.arange(256, dtype=np.float32) / 255
    table = np.concatenate([a + (b - a) * t for a, b in zip(c1, c2)])  # per-channel colour of t
    gradient = _ramp(rnd.randrange(_DIRECTIONS), 255.0, 128).convert("RGB")
    image = gradient.point(np.rint(table).astype(np.uint8).tolist())
    draw = ImageDraw.Draw(image)
    for _ in range(rnd.randrange(7)):
        color = jitter(rnd, mix(c1, c2, rnd.random()), 40)
        x, y, r = rnd.uniform(0, IMAGE_WIDTH), rnd.uniform(0, IMAGE_HEIGHT), rnd.uniform(8, 60)
        if rnd.random() < 0.5:
            draw.ellipse((x - r, y - r * rnd.uniform(0.5, 1.5), x + r, y + r), fill=color)
        else:
            draw.line((x, y, rnd.uniform(0, IMAGE_WIDTH), rnd.uniform(0, IMAGE_HEIGHT)), fill=color,
                      width=rnd.randrange(3, 14))
    return image


@functools.lru_cache(maxsize=2)
def _noise_banks(seed: int) -> tuple[Image.Image, ...]:
    """Gaussian noise around 128, larger than an image, one bank per noise level (sigma 2..7).

    Each image adds a window of one bank at a random offset: fresh noise per image would cost
    more than all the drawing.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    unit = rng.standard_normal((IMAGE_HEIGHT + _NOISE_MARGIN, IMAGE_WIDTH + _NOISE_MARGIN, 3), dtype=np.float32)
    return tuple(Image.fromarray(np.rint(128 + unit * sigma).clip(0, 255).astype(np.uint8))
                 for sigma in _NOISE_SIGMAS)


def photograph(image: Image.Image, rnd: random.Random, seed: int) -> bytes:
    """Lighting (gain, tint, contrast, side light), pixel noise, then JPEG encoding."""
    contrast = rnd.uniform(0.9, 1.1)
    gain = rnd.uniform(0.88, 1.1) * contrast
    offset = 128 * (1 - contrast) + rnd.uniform(-10, 10)
    levels = np.arange(256, dtype=np.float32)
    table = np.concatenate([levels * (gain * rnd.uniform(0.95, 1.05)) + offset for _ in range(3)])
    image = image.point(np.rint(table).clip(0, 255).astype(np.uint8).tolist())  # per-channel lookup
    light = _ramp(rnd.randrange(_DIRECTIONS), rnd.choice(_LIGHTS), 128).convert("RGB")
    image = ImageChops.add(image, light, offset=-128)  # clipped to 0..255
    ox, oy = rnd.randrange(_NOISE_MARGIN), rnd.randrange(_NOISE_MARGIN)
    noise = _noise_banks(seed)[rnd.randrange(len(_NOISE_SIGMAS))]
    image = ImageChops.add(image, noise.crop((ox, oy, ox + IMAGE_WIDTH, oy + IMAGE_HEIGHT)), offset=-128)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
