"""RGB colours and the clamped arithmetic on them shared by the sampler and the painter."""
from __future__ import annotations

import random
from typing import Sequence

RGB = tuple[int, int, int]


def jitter(rnd: random.Random, color: RGB, amount: float) -> RGB:
    """``color`` with each channel moved by up to ``amount``, clamped to 0..255."""
    return tuple(max(0, min(255, round(c + rnd.uniform(-amount, amount)))) for c in color)  # type: ignore[return-value]


def scaled(color: Sequence[float], factor: float) -> RGB:
    """``color`` times ``factor``, clamped to 0..255."""
    return tuple(max(0, min(255, round(c * factor))) for c in color)  # type: ignore[return-value]


def mix(a: Sequence[float], b: Sequence[float], t: float) -> RGB:
    """The colour a fraction ``t`` of the way from ``a`` to ``b``, clamped to 0..255."""
    return tuple(max(0, min(255, round(x + (y - x) * t))) for x, y in zip(a, b))  # type: ignore[return-value]
