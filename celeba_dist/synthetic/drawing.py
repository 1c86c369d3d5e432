"""Drawing a face: the painter (face-local shapes through the pose) and the hair, eyes, mouth, beard,
glasses and hat drawn by it, then photographed (:mod:`celeba_dist.synthetic.photo`) into a JPEG."""
from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from celeba_dist.synthetic.colors import RGB, mix, scaled
from celeba_dist.synthetic.labels import FACE_CENTER, KEY, Face, Look
from celeba_dist.synthetic.photo import background, photograph

_CIRCLE = np.stack([np.cos(t := np.linspace(0, 2 * np.pi, 40, endpoint=False)), np.sin(t)], axis=1)
_BEZIER_T = np.linspace(0.0, 1.0, 9)[:, None]
_BEZIER_W = np.hstack([(1 - _BEZIER_T) ** 2, 2 * (1 - _BEZIER_T) * _BEZIER_T, _BEZIER_T ** 2])  # (9, 3)


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return _CIRCLE * (rx, ry) + (cx, cy)


def _arc(cx: float, cy: float, rx: float, ry: float, t0: float, t1: float, n: int = 16) -> np.ndarray:
    t = np.linspace(t0, t1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _curve(p0: tuple[float, float], mid: tuple[float, float], p2: tuple[float, float]) -> np.ndarray:
    """9 points of the quadratic Bezier from p0 to p2 that passes through ``mid`` halfway."""
    p1 = (2 * mid[0] - (p0[0] + p2[0]) / 2, 2 * mid[1] - (p0[1] + p2[1]) / 2)
    return _BEZIER_W @ np.array([p0, p1, p2], dtype=np.float64)


def _face_outline(look: Look) -> np.ndarray:
    """(40, 2) outline: superellipse, rounder on top, squarer (male) or tapering (female) below."""
    c, s = _CIRCLE[:, 0], _CIRCLE[:, 1]  # v grows downwards, so s > 0 is the lower face
    lower = s > 0
    power = np.where(lower, look.jaw_power, 2.2)
    u = look.half_width * np.sign(c) * np.abs(c) ** (2 / power)
    v = np.where(lower, look.chin, look.top) * np.sign(s) * np.abs(s) ** (2 / power)
    u = u * np.where(lower, 1 - look.chin_taper * (v / look.chin) ** 2, 1.0)
    return np.stack([u, v], axis=1)


class _Painter:
    """Draws face-local shapes onto the image through the pose (shift, scale, rotation)."""

    def __init__(self, image: Image.Image, pose: tuple[float, float, float, float]) -> None:
        dx, dy, scale, angle = pose
        self.draw = ImageDraw.Draw(image)
        self.scale = scale
        c, s = math.cos(angle) * scale, math.sin(angle) * scale
        self._m = np.array([[c, s], [-s, c]])  # row vectors: (u, v) @ m = rotated, scaled
        self._t = np.array([FACE_CENTER[0] + dx, FACE_CENTER[1] + dy])

    def _xy(self, pts: np.ndarray) -> list[float]:
        return (pts @ self._m + self._t).ravel().tolist()

    def fill(self, pts: np.ndarray, color: RGB) -> None:
        self.draw.polygon(self._xy(pts), fill=color)

    def stroke(self, pts: np.ndarray, color: RGB, width: float, closed: bool = False) -> None:
        if closed:
            pts = np.vstack([pts, pts[:1]])
        self.draw.line(self._xy(pts), fill=color, width=max(1, round(width * self.scale)), joint="curve")


def _draw_back_hair(p: _Painter, look: Look) -> None:
    """Long hair behind the head and down to the shoulders (women)."""
    if look.hair is None or not look.long_hair:
        return
    w = look.half_width + 11
    top = _arc(0, -6, w, look.top + 8, math.pi, 2 * math.pi)
    down = np.array([[w + 3, look.long_hair], [0, look.long_hair + 8], [-w - 3, look.long_hair]])
    p.fill(np.vstack([top, down]), look.hair)


def _draw_body(p: _Painter, look: Look) -> None:
    p.fill(_ellipse(0, 122, 92, 50), look.clothes)
    neck = 0.42 * look.half_width
    p.fill(np.array([[-neck, 30], [neck, 30], [neck + 4, 100], [-neck - 4, 100]]), scaled(look.skin, 0.85))
    if not look.long_hair:  # long hair covers the ears
        for side in (-1, 1):
            p.fill(_ellipse(side * (look.half_width - 1), -6, 7, 13), scaled(look.skin, 0.92))


def _draw_top_hair(p: _Painter, look: Look) -> None:
    """Hair over the skull down to the hairline, or a jagged fringe (Bangs) down to the eyebrows."""
    if look.hair is None:  # bald: a highlight on the scalp
        p.fill(_ellipse(-0.25 * look.half_width, -0.78 * look.top, 13, 6), scaled(look.skin, 1.12))
        return
    a = look.half_width
    outer = _arc(0, -6, a + (7 if look.long_hair else 4), look.top + 4, math.pi, 2 * math.pi)
    if look.bangs:
        xs = np.linspace(a - 4, -(a - 4), 11)
        fringe = np.stack([xs, np.where(np.arange(11) % 2 == 0, -29.0, -21.0)], axis=1)
        inner = np.vstack([[[a - 1, -6], [a - 3, -20]], fringe, [[-(a - 3), -20], [-(a - 1), -6]]])
    else:
        line = _curve((a - 6, look.hairline + 8), (0, look.hairline), (-(a - 6), look.hairline + 8))
        inner = np.vstack([[[a - 1, -6], [a - 4, -32]], line, [[-(a - 4), -32], [-(a - 1), -6]]])
    p.fill(np.vstack([outer, inner]), look.hair)
    strand = scaled(look.hair, 0.75)
    for x in (-0.5 * a, -0.15 * a, 0.2 * a, 0.55 * a):  # a few strands: hair has texture, a scalp not
        p.stroke(_curve((x - 5, -look.top + 1), (x, -look.top + 7), (x + 3, -look.top + 14)), strand, 2)


def _draw_eyes_and_nose(p: _Painter, look: Look) -> None:
    for side in (-1, 1):
        x = side * look.eye_gap
        p.fill(_ellipse(x, -14, 7.5, look.eye_height), (238, 238, 232))
        p.fill(_ellipse(x, -14, 3.4, min(3.4, look.eye_height)), look.eye_color)
        p.fill(_ellipse(x, -14, 1.5, 1.5), (15, 10, 10))
        p.stroke(_arc(x, -14, 7.5, look.eye_height, math.pi, 2 * math.pi, 8), (40, 30, 30), 1.5)
        brow = _curve((x - side * 9, -24), (x, -28), (x + side * 10, -24.5))
        p.stroke(brow, look.brow_color, look.brow_width)
    nose = np.array([[-2, -6], [-4.5, 7], [0, 10], [4.5, 7.5]])
    p.stroke(nose, scaled(look.skin, 0.72), 2)


def _draw_mouth(p: _Painter, look: Look) -> None:
    w, corner, mid, gap, lip = (look.mouth_half_width, look.mouth_corner, look.mouth_mid,
                                look.mouth_gap, look.lip_thickness)
    left, right = (-w, corner), (w, corner)
    upper = _curve(left, (0, mid), right)
    lower = _curve(left, (0, mid + gap), right)
    taper = np.sin(np.linspace(0, np.pi, 9))[:, None] * (0, 1)  # lips thin out towards the corners
    p.fill(np.vstack([upper, (upper - taper * lip)[::-1]]), look.lip_color)
    p.fill(np.vstack([lower, (lower + taper * lip * 1.2)[::-1]]), look.lip_color)
    if gap:
        if look.mouth_open:
            p.fill(np.vstack([upper, lower[::-1]]), (60, 15, 20))
        if look.teeth:  # the whole gap of a closed grin, the upper part of an open one
            depth = min(6.0, gap / 2) if look.mouth_open else gap
            p.fill(np.vstack([upper, (upper + taper * depth)[::-1]]), (236, 236, 226))
    else:
        p.stroke(upper, scaled(look.lip_color, 0.55), 2)


def _draw_facial_hair(p: _Painter, look: Look) -> None:
    w, corner, lip_top = look.mouth_half_width, look.mouth_corner, look.mouth_mid - look.lip_thickness
    if look.mustache:
        top = _curve((-(w + 1), corner - 8), (0, 14), (w + 1, corner - 8))
        bottom = _curve((w + 3, corner - 2), (0, lip_top - 1), (-(w + 3), corner - 2))
        p.fill(np.vstack([top, bottom]), look.beard_color)
    if look.goatee:
        top, bottom = look.mouth_mid + look.mouth_gap + 1.2 * look.lip_thickness + 2, look.chin - 2
        middle = (top + bottom) / 2
        p.fill(np.array([[-12, top], [12, top], [11, middle], [5, bottom], [-5, bottom], [-11, middle]]),
               look.beard_color)
    if look.jaw_beard:  # a band along the jaw line from ear to ear, round the chin
        outline = _face_outline(look)
        band = outline[outline[:, 1] >= 0]  # the lower face: angles 0..pi
        band = band[np.argsort(np.arctan2(band[:, 1], band[:, 0]))]  # right ear -> chin -> left ear
        inner = band * (1 - 10 / look.half_width, 1 - 10 / look.chin)
        p.fill(np.vstack([band, inner[::-1]]), look.beard_color)


def _draw_glasses(p: _Painter, look: Look) -> None:
    if look.glasses is None:
        return
    sunglasses, frame, rx, ry = look.glasses
    g = look.eye_gap
    for side in (-1, 1):
        lens = _ellipse(side * g, -14, rx, ry)
        if sunglasses:
            p.fill(lens, scaled(frame, 0.6))
        p.stroke(lens, frame, 3.5, closed=True)
        p.stroke(np.array([[side * (g + rx), -15], [side * (look.half_width - 1), -13]]), frame, 3)
    p.stroke(_curve((-(g - rx), -15), (0, -18), (g - rx, -15)), frame, 3.5)


def _draw_hat(p: _Painter, look: Look) -> None:
    """A brimmed hat, or a cap with a visor; both with a contrasting band, wider than the head."""
    if look.hat is None:
        return
    kind, color, crown = look.hat
    a = look.half_width
    band = scaled(color, 0.45) if sum(color) > 300 else mix(color, (255, 255, 255), 0.6)
    if kind == "brim":
        p.fill(_arc(0, -42, a * 0.92, crown, math.pi, 2 * math.pi), color)
        p.stroke(np.array([[-a * 0.9, -48], [a * 0.9, -48]]), band, 7)
        p.fill(_ellipse(0, -41, a + 24, 8), scaled(color, 0.85))
    else:
        p.fill(_arc(0, -40, a + 5, look.top - 28 + crown / 2, math.pi, 2 * math.pi), color)
        p.stroke(np.array([[-(a + 4), -42], [a + 4, -42]]), band, 6)
        p.fill(_arc(0, -40, a * 0.8, 13, 0, math.pi), scaled(color, 0.7))  # visor, seen from the front
        p.fill(_ellipse(0, -40 - (look.top - 28 + crown / 2), 5, 4), band)  # button on top


def render_face(face: Face, *, seed: int) -> bytes:
    """The JPEG bytes of one face (deterministic in ``seed`` and the image index)."""
    rnd = random.Random(f"{KEY}/{seed}/render/{face.labels.index}")
    look = face.look
    image = background(rnd)
    painter = _Painter(image, look.pose)
    _draw_back_hair(painter, look)
    _draw_body(painter, look)
    painter.fill(_face_outline(look), look.skin)
    _draw_top_hair(painter, look)
    _draw_eyes_and_nose(painter, look)
    _draw_mouth(painter, look)
    _draw_facial_hair(painter, look)
    _draw_glasses(painter, look)
    _draw_hat(painter, look)
    return photograph(image, rnd, seed)
