"""One image, made ready for a shard: read, fully decoded, converted to an RGB JPEG where needed.

The work runs in worker processes (:func:`encoded_images`); each result says what to store or why
the image is bad.
"""
from __future__ import annotations

import io
import signal
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from PIL import Image, UnidentifiedImageError

from celeba_dist.pack.sources import ImageStore
from celeba_dist.workers import ordered_map, process_pool

RESAMPLE = "bicubic"  # the manifest's name for Image.Resampling.BICUBIC, used by --resize


@dataclass(frozen=True)
class Encoded:
    """A worker's result for one image: the JPEG to store, or the error that makes it bad."""

    jpg: bytes | None
    size: tuple[int, int] | None = None
    converted: str | None = None  # why it was re-encoded: "png", "grayscale", "cmyk", ...
    error: str | None = None


def conversion_reason(image: Image.Image) -> str | None:
    """Why an image must be converted to an RGB JPEG (None: it is one already)."""
    if image.format != "JPEG":
        return (image.format or "unknown").lower()
    if image.mode in ("L", "LA", "1", "I", "I;16", "F"):
        return "grayscale"
    return None if image.mode == "RGB" else image.mode.lower()


def encode_image(data: bytes, *, resize: tuple[int, int] | None, quality: int) -> Encoded:
    """Fully decode ``data``; keep it as is if it is an RGB JPEG and no resize is asked, else re-encode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # the full decode: truncated or corrupt data raises here
            reason = conversion_reason(image)
            if reason is None and resize is None:
                return Encoded(data, image.size)
            rgb = image.convert("RGB")
    except UnidentifiedImageError:
        return Encoded(None, error="not an image file (PIL cannot identify it)")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return Encoded(None, error=f"corrupt or truncated image: {e}")
    if resize is not None:
        rgb = rgb.resize(resize, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return Encoded(out.getvalue(), rgb.size, reason)


@dataclass(frozen=True)
class ImageEncoder:
    """Reads one image from the store and encodes it; one lives in each worker process."""

    store: ImageStore
    resize: tuple[int, int] | None
    quality: int

    def __call__(self, locator: Any) -> Encoded:
        try:
            data = self.store.read(locator)
        except (OSError, KeyError, zipfile.BadZipFile, zlib.error, EOFError) as e:
            # a damaged zip member (bad CRC, corrupt deflate stream, cut short) is one bad image, not a crash
            return Encoded(None, error=f"cannot read the image: {e}")
        return encode_image(data, resize=self.resize, quality=self.quality)


@contextmanager
def encoded_images(encoder: ImageEncoder, locators: Iterable[Any], *, workers: int) -> Iterator[Iterator[Encoded]]:
    """The results of ``encoder`` over ``locators``, in order, from ``workers`` processes (or this one)."""
    with process_pool(workers, _install_encoder, (encoder,)) as pool:
        yield ordered_map(pool, _encode_in_worker, locators) if pool else map(encoder, locators)


_worker_encoder: ImageEncoder | None = None


def _install_encoder(encoder: ImageEncoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder
    # the parent turns these into a clean stop; in a worker they keep their default meaning
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "SIGUSR2"):
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def _encode_in_worker(locator: Any) -> Encoded:
    assert _worker_encoder is not None
    return _worker_encoder(locator)
