"""A synthetic CelebA: drawn cartoon faces in the exact layout and text formats of the official release.

No machine of this project can download CelebA, so ``celeba-dist synth OUT_DIR --num-images N``
writes a stand-in that every CelebA reader (``torchvision.datasets.CelebA`` included) accepts::

    OUT_DIR/img_align_celeba/000001.jpg ...   178 wide x 218 high RGB JPEG, quality 90
    OUT_DIR/list_attr_celeba.txt              count; the 40 names (trailing space); rows of -1/1
    OUT_DIR/list_eval_partition.txt           0 train / 1 valid / 2 test, contiguous by image id
    OUT_DIR/identity_CelebA.txt               identity per image (<= 20 images each, disjoint across splits)
    OUT_DIR/list_bbox_celeba.txt              plausible in-the-wild face boxes (they describe no pixels)
    OUT_DIR/list_landmarks_align_celeba.txt   the drawn eye centres, nose tip and mouth corners

Every text file has CRLF line endings and the official column spacing (see :func:`annotation_files`).
The split keeps the official fractions (162770 / 19867 / 19962 of 202599).

What the pixels show: the 16 ``DRAWN_ATTRIBUTES`` of :mod:`celeba_dist.attributes`, sized to survive
CenterCrop(178) -> Resize(64):

- Smiling: a broad grin, corners curved well up, a band of white teeth always showing; otherwise a
  narrower flat or slightly downturned mouth, never with teeth.
- Mouth_Slightly_Open: a dark gap between the lips (below the teeth when also smiling).
- Eyeglasses: thick dark frames round both eyes with a bridge and arms; a third are sunglasses.
- Wearing_Hat: a brimmed hat, or a cap with a visor, over the top of the head; both are wider than
  the head and have a contrasting band. A hat hides baldness: Bald is then -1.
- Bald: no hair at all, a skin-coloured scalp with a highlight; no hair colour, no Bangs.
- Bangs: a jagged fringe over the forehead down to the eyebrows; otherwise bare forehead.
- Black_Hair, Blond_Hair, Brown_Hair, Gray_Hair: the hair colour. At most one is 1; the others have
  auburn or copper hair, or none (bald).
- Mustache: a band between nose and upper lip. Goatee: a patch on the chin below the lower lip.
- No_Beard: no facial hair; -1 means a mustache, a goatee, or a beard along the jaw line.
- Pale_Skin: very light, nearly white skin.
- Wearing_Lipstick: thick red or pink lips; otherwise thin lips in a darkened skin tone.
- Male: a wider face with a square jaw, short hair and visible ears; women have a narrower, tapering
  chin and long hair down past the jaw. Beards are male only, lipstick nearly always female.

The other 24 attributes leave no trace in the pixels; they follow roughly the official positive rates
and correlations (5_o_Clock_Shadow, Sideburns, Big_Nose, Bushy_Eyebrows mostly male; Heavy_Makeup,
Wearing_Earrings, Arched_Eyebrows mostly female; High_Cheekbones and Mouth_Slightly_Open with Smiling;
Bags_Under_Eyes with age; Gray_Hair with not Young). Male, Young, skin tone (unless Pale_Skin) and
face shape are traits of an identity; everything else is drawn per image.

Rates differ from CelebA on purpose only for rare drawn attributes, so that small synthetic sets
still hold enough positives to learn from: Eyeglasses 0.12 (CelebA 0.065), Wearing_Hat 0.12 (0.048),
Bald ~0.09 (0.022), Pale_Skin ~0.08 (0.043), Mustache ~0.07 (0.042), Goatee ~0.08 (0.063).

Nuisances keep the task from being trivial: gradient and textured backgrounds, pose (shift of up to
6 px, scale 0.92-1.08, rotation up to 8 degrees), skin tones, colour jitter, brightness, contrast,
tint and side lighting, Gaussian pixel noise, then JPEG compression.

Determinism: image ``i`` depends only on ``(seed, i, N)`` (``random.Random`` seeded by a string key,
plus noise banks seeded by ``seed``), so one seed gives byte-identical files whatever ``--workers``
(with the same Pillow/libjpeg build). ``--workers W`` renders in W processes (fork where available).
"""
from __future__ import annotations

import argparse
import functools
import io
import logging
import math
import multiprocessing
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from celeba_dist.attributes import CELEBA_ATTRIBUTES

log = logging.getLogger(__name__)

RGB = tuple[int, int, int]

IMAGE_WIDTH, IMAGE_HEIGHT = 178, 218
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

# Official split sizes (train, valid, test); a synthetic set of N images keeps their fractions.
OFFICIAL_SPLIT_SIZES = (162_770, 19_867, 19_962)
IMAGES_PER_IDENTITY = 20  # CelebA: 202599 images of 10177 identities; fewer in small sets
_KEY = "celeba-synth-v1"  # prefix of every random.Random seed string; bump to change all images
_FACE_CENTER = (89.0, 125.0)  # image position of the face-local origin (between eyes and mouth)
_NOISE_MARGIN = 64
_NOISE_SIGMAS = (2.0, 3.5, 5.0, 7.0)

_SKIN_TONES: tuple[RGB, ...] = (
    (234, 192, 160), (224, 178, 145), (205, 155, 120), (180, 130, 95), (140, 98, 70), (105, 72, 50),
)
_PALE_SKIN: RGB = (250, 236, 228)
_HAIR_COLORS: dict[str, RGB] = {
    "Black_Hair": (25, 22, 22),
    "Brown_Hair": (118, 76, 42),
    "Blond_Hair": (230, 198, 126),
    "Gray_Hair": (170, 170, 174),
    "auburn": (168, 52, 28),
    "copper": (218, 118, 46),
}
_EYE_COLORS: tuple[RGB, ...] = ((90, 55, 30), (45, 30, 20), (70, 110, 160), (80, 120, 80), (120, 90, 50))
_LIPSTICKS: tuple[RGB, ...] = ((200, 20, 40), (215, 40, 80), (170, 15, 35), (225, 60, 100))
_HAT_COLORS: tuple[RGB, ...] = (
    (30, 30, 35), (130, 30, 30), (30, 50, 110), (200, 190, 160), (60, 90, 50), (150, 110, 70), (225, 225, 220),
)


# --------------------------------------------------------------------------- attributes and looks

@dataclass(frozen=True)
class Identity:
    """Traits shared by all images of one person."""

    male: bool
    young: bool
    skin: RGB
    half_width: float  # face half width in px at scale 1
    jaw_power: float  # superellipse exponent of the lower face: 2 = oval, 3+ = square jaw
    chin_taper: float
    eye_gap: float  # half the distance between the eyes
    eye_color: RGB
    traits: tuple[tuple[str, bool], ...]  # undrawn face-shape attributes


@dataclass(frozen=True)
class Look:
    """Everything the painter needs for one face, in face-local pixels (origin at the face centre)."""

    pose: tuple[float, float, float, float]  # dx, dy, scale, angle in radians
    skin: RGB
    half_width: float
    top: float  # skull top above the origin
    chin: float  # chin below the origin
    jaw_power: float
    chin_taper: float
    hair: RGB | None  # None: bald
    long_hair: float  # 0 for short hair, else hair length below the origin
    bangs: bool
    hairline: float
    eye_gap: float
    eye_height: float
    eye_color: RGB
    brow_width: float
    brow_color: RGB
    mouth_half_width: float
    mouth_corner: float  # v of the mouth corners
    mouth_mid: float  # v of the mouth line at its centre
    mouth_gap: float  # 0: closed
    lip_thickness: float
    lip_color: RGB
    teeth: bool
    mouth_open: bool  # a dark gap between the lips (a closed grin shows teeth only)
    mustache: bool
    goatee: bool
    jaw_beard: bool
    beard_color: RGB
    glasses: tuple[bool, RGB, float, float] | None  # sunglasses, frame colour, lens rx, ry
    hat: tuple[str, RGB, float] | None  # kind, colour, crown height
    clothes: RGB


@dataclass(frozen=True)
class Labels:
    """One image's rows in the five annotation files."""

    index: int  # 0-based; the file is f"{index + 1:06d}.jpg"
    identity: int
    partition: int  # 0 train, 1 valid, 2 test
    attributes: tuple[int, ...]  # -1/1 in CELEBA_ATTRIBUTES order
    landmarks: tuple[int, ...]  # LANDMARK_NAMES order, image pixels
    bbox: tuple[int, int, int, int]  # x_1, y_1, width, height in an imagined in-the-wild photo

    @property
    def filename(self) -> str:
        return f"{self.index + 1:06d}.jpg"


@dataclass(frozen=True)
class Face:
    """One synthetic image: its labels and how to draw it."""

    labels: Labels
    look: Look


def split_counts(num_images: int) -> tuple[int, int, int]:
    """Train/valid/test sizes with the official fractions (exactly official for 202599 images)."""
    total = sum(OFFICIAL_SPLIT_SIZES)
    n_train = round(num_images * OFFICIAL_SPLIT_SIZES[0] / total)
    n_valid = round(num_images * (OFFICIAL_SPLIT_SIZES[0] + OFFICIAL_SPLIT_SIZES[1]) / total) - n_train
    return n_train, n_valid, num_images - n_train - n_valid


@functools.lru_cache(maxsize=4)
def _identity_pools(seed: int, num_images: int) -> tuple[tuple[int, ...], ...]:
    """Identity ids per split: disjoint, like the official split, and shuffled ids like 2880, 2937.

    A split of n images has about min(20, sqrt(n)) images per identity, so that small sets still
    hold many people.
    """
    per_identity = [min(IMAGES_PER_IDENTITY, max(2, round(math.sqrt(n)))) for n in split_counts(num_images)]
    sizes = [math.ceil(n / k) for n, k in zip(split_counts(num_images), per_identity)]
    ids = list(range(1, sum(sizes) + 1))
    random.Random(f"{_KEY}/{seed}/identities").shuffle(ids)
    starts = np.cumsum([0, *sizes]).tolist()
    return tuple(tuple(ids[a:b]) for a, b in zip(starts[:-1], starts[1:]))


def _partition_of(index: int, num_images: int) -> int:
    n_train, n_valid, _ = split_counts(num_images)
    return 0 if index < n_train else 1 if index < n_train + n_valid else 2


def _jitter(rnd: random.Random, color: RGB, amount: float) -> RGB:
    return tuple(max(0, min(255, round(c + rnd.uniform(-amount, amount)))) for c in color)  # type: ignore[return-value]


def _scaled(color: Sequence[float], factor: float) -> RGB:
    return tuple(max(0, min(255, round(c * factor))) for c in color)  # type: ignore[return-value]


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> RGB:
    return tuple(max(0, min(255, round(x + (y - x) * t))) for x, y in zip(a, b))  # type: ignore[return-value]


@functools.lru_cache(maxsize=65_536)
def sample_identity(seed: int, identity: int) -> Identity:
    """The traits of one identity; the same for every image of it."""
    rnd = random.Random(f"{_KEY}/{seed}/identity/{identity}")
    male = rnd.random() < 0.417
    young = rnd.random() < (0.67 if male else 0.85)
    p = (lambda pm, pf: rnd.random() < (pm if male else pf))
    traits = (
        ("Big_Nose", p(0.45, 0.08)), ("Pointy_Nose", p(0.18, 0.35)), ("Oval_Face", p(0.22, 0.33)),
        ("Chubby", p(0.12, 0.015)), ("Double_Chin", p(0.09, 0.015)),
    )
    return Identity(
        male=male, young=young, skin=_jitter(rnd, rnd.choice(_SKIN_TONES), 6),
        half_width=rnd.uniform(46, 51) if male else rnd.uniform(40, 44),
        jaw_power=rnd.uniform(2.8, 3.4) if male else rnd.uniform(1.9, 2.2),
        chin_taper=rnd.uniform(0.0, 0.05) if male else rnd.uniform(0.14, 0.22),
        eye_gap=rnd.uniform(17.5, 20.5), eye_color=rnd.choice(_EYE_COLORS), traits=traits,
    )


def _hair_class(rnd: random.Random, male: bool, young: bool) -> str:
    if rnd.random() < (0.02 if young else 0.16):
        return "Gray_Hair"
    weights = (0.30, 0.05, 0.22) if male else (0.24, 0.25, 0.23)  # black, blond, brown
    u = rnd.random()
    for name, w in zip(("Black_Hair", "Blond_Hair", "Brown_Hair"), weights):
        if u < w:
            return name
        u -= w
    return rnd.choice(("auburn", "copper"))


def _sample_attributes(rnd: random.Random, ident: Identity) -> tuple[dict[str, bool], str | None]:
    """All 40 labels for one image, with CelebA-like rates and correlations; also the hair class."""
    male, young = ident.male, ident.young
    p = (lambda pm, pf: rnd.random() < (pm if male else pf))
    a = dict.fromkeys(CELEBA_ATTRIBUTES, False)
    a.update(ident.traits)
    a["Male"], a["Young"] = male, young
    a["Wearing_Hat"] = rnd.random() < 0.12
    a["Bald"] = male and not a["Wearing_Hat"] and rnd.random() < (0.2 if young else 0.4)
    hair = None if a["Bald"] else _hair_class(rnd, male, young)
    if hair in a:
        a[hair] = True
    if hair is not None:
        a["Bangs"] = p(0.09, 0.2)
        u, wavy = rnd.random(), (0.14 if male else 0.45)
        a["Wavy_Hair"], a["Straight_Hair"] = u < wavy, wavy <= u < wavy + 0.23
        a["Receding_Hairline"] = not a["Bangs"] and p(0.12, 0.05)
    beard = rnd.random() if male else 0.0
    a["Mustache"] = 0.55 <= beard < 0.62 or 0.71 <= beard < 0.81
    a["Goatee"] = 0.62 <= beard < 0.81
    a["No_Beard"] = beard < 0.55
    a["5_o_Clock_Shadow"] = male and rnd.random() < (0.3 if a["No_Beard"] else 0.15)
    a["Sideburns"] = male and rnd.random() < (0.04 if a["No_Beard"] else 0.35)
    a["Smiling"] = p(0.41, 0.53)
    a["Mouth_Slightly_Open"] = rnd.random() < (0.7 if a["Smiling"] else 0.28)
    a["High_Cheekbones"] = rnd.random() < (0.78 if a["Smiling"] else 0.16)
    a["Narrow_Eyes"] = rnd.random() < (0.16 if a["Smiling"] else 0.07)
    a["Wearing_Lipstick"] = p(0.005, 0.8)
    a["Heavy_Makeup"] = p(0.002, 0.78 if a["Wearing_Lipstick"] else 0.1)
    a["Attractive"] = rnd.random() < ((0.38, 0.12), (0.75, 0.35))[not male][not young]
    a["Arched_Eyebrows"] = p(0.06, 0.42)
    a["Bags_Under_Eyes"] = rnd.random() < (0.14 if young else 0.42)
    a["Big_Lips"] = p(0.2, 0.27)
    a["Blurry"] = rnd.random() < 0.05
    a["Bushy_Eyebrows"] = p(0.25, 0.07)
    a["Rosy_Cheeks"] = p(0.005, 0.11)
    a["Wearing_Earrings"] = p(0.01, 0.31)
    a["Wearing_Necklace"] = p(0.005, 0.2)
    a["Wearing_Necktie"] = p(0.17, 0.002)
    a["Eyeglasses"] = p(0.16, 0.09)
    a["Pale_Skin"] = p(0.05, 0.1)
    return a, hair


def _sample_mouth(rnd: random.Random, a: dict[str, bool]) -> dict[str, float | bool | RGB]:
    smiling, open_ = a["Smiling"], a["Mouth_Slightly_Open"]
    mid = rnd.uniform(27, 30)
    if smiling:  # a broad grin: wide, corners well up, teeth always showing
        half_width, corner = rnd.uniform(21, 24), mid - rnd.uniform(9, 12)
        gap = rnd.uniform(11, 14) if open_ else rnd.uniform(6, 8)
    else:
        half_width, corner = rnd.uniform(11, 14), mid + rnd.uniform(-0.5, 2.5)
        gap = rnd.uniform(6, 9) if open_ else 0.0
    lipstick = a["Wearing_Lipstick"]
    return dict(
        mouth_half_width=half_width, mouth_corner=corner, mouth_mid=mid, mouth_gap=gap,
        lip_thickness=rnd.uniform(4, 5.5) if lipstick else rnd.uniform(2.5, 3.5),
        teeth=smiling, mouth_open=open_,
    )


def _sample_look(rnd: random.Random, ident: Identity, a: dict[str, bool], hair: str | None) -> Look:
    skin = _jitter(rnd, _PALE_SKIN, 4) if a["Pale_Skin"] else ident.skin
    hair_rgb = None if hair is None else _jitter(rnd, _scaled(_HAIR_COLORS[hair], rnd.uniform(0.92, 1.08)), 8)
    dark = _jitter(rnd, (45, 35, 30), 12)
    beard_color = _scaled(hair_rgb, 0.65) if hair_rgb else dark
    mouth = _sample_mouth(rnd, a)
    lipstick = _jitter(rnd, rnd.choice(_LIPSTICKS), 10)
    natural_lips = _scaled(_mix(skin, (160, 70, 70), 0.45), 0.85)
    glasses = None
    if a["Eyeglasses"]:
        frame = _jitter(rnd, rnd.choice(((25, 25, 25), (70, 40, 25), (40, 40, 70))), 10)
        glasses = (rnd.random() < 0.33, frame, rnd.uniform(12, 14), rnd.uniform(9, 11))
    hat = None
    if a["Wearing_Hat"]:
        hat = (rnd.choice(("brim", "cap")), _jitter(rnd, rnd.choice(_HAT_COLORS), 15), rnd.uniform(38, 50))
    return Look(
        pose=(rnd.uniform(-6, 6), rnd.uniform(-6, 6), rnd.uniform(0.92, 1.08), math.radians(rnd.uniform(-8, 8))),
        skin=skin, half_width=ident.half_width, top=rnd.uniform(70, 74),
        chin=rnd.uniform(60, 64) if ident.male else rnd.uniform(57, 61),
        jaw_power=ident.jaw_power, chin_taper=ident.chin_taper, hair=hair_rgb,
        long_hair=0.0 if ident.male else rnd.uniform(60, 100), bangs=a["Bangs"],
        hairline=rnd.uniform(-50, -46),
        eye_gap=ident.eye_gap, eye_height=rnd.uniform(3.5, 4.8), eye_color=ident.eye_color,
        brow_width=rnd.uniform(4, 5.5) if ident.male else rnd.uniform(2.5, 3.5),
        brow_color=_scaled(hair_rgb, 0.7) if hair_rgb else dark,
        lip_color=lipstick if a["Wearing_Lipstick"] else natural_lips,
        mustache=a["Mustache"], goatee=a["Goatee"], jaw_beard=not (a["No_Beard"] or a["Mustache"] or a["Goatee"]),
        beard_color=beard_color, glasses=glasses, hat=hat,
        clothes=(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)), **mouth,  # type: ignore[arg-type]
    )


def _to_image(pose: tuple[float, float, float, float], u: float, v: float) -> tuple[float, float]:
    dx, dy, scale, angle = pose
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    return _FACE_CENTER[0] + dx + c * u - s * v, _FACE_CENTER[1] + dy + s * u + c * v


def _landmarks(look: Look) -> tuple[int, ...]:
    local = (
        (-look.eye_gap, -14.0), (look.eye_gap, -14.0), (0.0, 10.0),
        (-look.mouth_half_width, look.mouth_corner), (look.mouth_half_width, look.mouth_corner),
    )
    return tuple(round(c) for u, v in local for c in _to_image(look.pose, u, v))


def _bbox(rnd: random.Random) -> tuple[int, int, int, int]:
    width = round(math.exp(rnd.uniform(math.log(70), math.log(560))))
    height = round(width * rnd.uniform(1.36, 1.41))
    return round(width * rnd.uniform(0.2, 1.2)), round(height * rnd.uniform(0.1, 0.45)), width, height


def sample_face(seed: int, index: int, num_images: int) -> Face:
    """The labels and the look of image ``index`` (0-based) of a set of ``num_images``."""
    partition = _partition_of(index, num_images)
    rnd = random.Random(f"{_KEY}/{seed}/image/{index}")
    identity = rnd.choice(_identity_pools(seed, num_images)[partition])
    ident = sample_identity(seed, identity)
    attrs, hair = _sample_attributes(rnd, ident)
    look = _sample_look(rnd, ident, attrs, hair)
    labels = Labels(
        index=index, identity=identity, partition=partition,
        attributes=tuple(1 if attrs[name] else -1 for name in CELEBA_ATTRIBUTES),
        landmarks=_landmarks(look), bbox=_bbox(rnd),
    )
    return Face(labels=labels, look=look)


# --------------------------------------------------------------------------- drawing

_CIRCLE = np.stack([np.cos(t := np.linspace(0, 2 * np.pi, 40, endpoint=False)), np.sin(t)], axis=1)
_BEZIER_T = np.linspace(0.0, 1.0, 9)[:, None]
_BEZIER_W = np.hstack([(1 - _BEZIER_T) ** 2, 2 * (1 - _BEZIER_T) * _BEZIER_T, _BEZIER_T ** 2])  # (9, 3)
_GRID_Y, _GRID_X = np.mgrid[0:IMAGE_HEIGHT, 0:IMAGE_WIDTH].astype(np.float32)
_GRID_X = _GRID_X / IMAGE_WIDTH - 0.5  # (H, W), -0.5 .. 0.5
_GRID_Y = _GRID_Y / IMAGE_HEIGHT - 0.5


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
        self._t = np.array([_FACE_CENTER[0] + dx, _FACE_CENTER[1] + dy])

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
    p.fill(np.array([[-neck, 30], [neck, 30], [neck + 4, 100], [-neck - 4, 100]]), _scaled(look.skin, 0.85))
    if not look.long_hair:  # long hair covers the ears
        for side in (-1, 1):
            p.fill(_ellipse(side * (look.half_width - 1), -6, 7, 13), _scaled(look.skin, 0.92))


def _draw_top_hair(p: _Painter, look: Look) -> None:
    """Hair over the skull down to the hairline, or a jagged fringe (Bangs) down to the eyebrows."""
    if look.hair is None:  # bald: a highlight on the scalp
        p.fill(_ellipse(-0.25 * look.half_width, -0.78 * look.top, 13, 6), _scaled(look.skin, 1.12))
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
    strand = _scaled(look.hair, 0.75)
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
    p.stroke(nose, _scaled(look.skin, 0.72), 2)


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
        p.stroke(upper, _scaled(look.lip_color, 0.55), 2)


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
            p.fill(lens, _scaled(frame, 0.6))
        p.stroke(lens, frame, 3.5, closed=True)
        p.stroke(np.array([[side * (g + rx), -15], [side * (look.half_width - 1), -13]]), frame, 3)
    p.stroke(_curve((-(g - rx), -15), (0, -18), (g - rx, -15)), frame, 3.5)


def _draw_hat(p: _Painter, look: Look) -> None:
    """A brimmed hat, or a cap with a visor; both with a contrasting band, wider than the head."""
    if look.hat is None:
        return
    kind, color, crown = look.hat
    a = look.half_width
    band = _scaled(color, 0.45) if sum(color) > 300 else _mix(color, (255, 255, 255), 0.6)
    if kind == "brim":
        p.fill(_arc(0, -42, a * 0.92, crown, math.pi, 2 * math.pi), color)
        p.stroke(np.array([[-a * 0.9, -48], [a * 0.9, -48]]), band, 7)
        p.fill(_ellipse(0, -41, a + 24, 8), _scaled(color, 0.85))
    else:
        p.fill(_arc(0, -40, a + 5, look.top - 28 + crown / 2, math.pi, 2 * math.pi), color)
        p.stroke(np.array([[-(a + 4), -42], [a + 4, -42]]), band, 6)
        p.fill(_arc(0, -40, a * 0.8, 13, 0, math.pi), _scaled(color, 0.7))  # visor, seen from the front
        p.fill(_ellipse(0, -40 - (look.top - 28 + crown / 2), 5, 4), band)  # button on top


_DIRECTIONS = 16  # gradient and side-light directions, multiples of 22.5 degrees
_LIGHTS = (0, 12, 24, 36)  # side-light strength: brightness difference between opposite edges


@functools.lru_cache(maxsize=None)
def _ramp(direction: int, amplitude: float, base: int) -> Image.Image:
    """An "L" image ``base + amplitude * t`` where t runs from -0.5 to 0.5 along ``direction``."""
    angle = 2 * math.pi * direction / _DIRECTIONS
    t = _GRID_X * math.cos(angle) + _GRID_Y * math.sin(angle)
    return Image.fromarray(np.rint(base + amplitude * t).clip(0, 255).astype(np.uint8))


def _background(rnd: random.Random) -> Image.Image:
    """A two-colour linear gradient in one of 16 directions with a few low-contrast shapes."""
    c1 = [rnd.randrange(256) for _ in range(3)]
    c2 = [rnd.randrange(256) for _ in range(3)]
    t = np.arange(256, dtype=np.float32) / 255
    table = np.concatenate([a + (b - a) * t for a, b in zip(c1, c2)])  # per-channel colour of t
    gradient = _ramp(rnd.randrange(_DIRECTIONS), 255.0, 128).convert("RGB")
    image = gradient.point(np.rint(table).astype(np.uint8).tolist())
    draw = ImageDraw.Draw(image)
    for _ in range(rnd.randrange(7)):
        color = _jitter(rnd, _mix(c1, c2, rnd.random()), 40)
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


def _photograph(image: Image.Image, rnd: random.Random, seed: int) -> bytes:
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


def render_face(face: Face, *, seed: int) -> bytes:
    """The JPEG bytes of one face (deterministic in ``seed`` and the image index)."""
    rnd = random.Random(f"{_KEY}/{seed}/render/{face.labels.index}")
    look = face.look
    image = _background(rnd)
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
    return _photograph(image, rnd, seed)


# --------------------------------------------------------------------------- annotation files

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


# --------------------------------------------------------------------------- writing

class DifferentCelebAError(FileExistsError):
    """OUT_DIR already holds a CelebA that this run would not reproduce byte for byte."""


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _first_line(path: Path) -> str:
    with path.open("rb") as handle:
        return handle.readline().decode("ascii", "replace").strip()


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
        _write_atomic(Path(image_dir, face.labels.filename), render_face(face, seed=seed))
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
    if not 1 <= num_images <= MAX_IMAGES:
        raise ValueError(f"num_images must be in 1..{MAX_IMAGES}, got {num_images}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if any((out / name).exists() for name in ANNOTATION_FILES):  # a regeneration? compare before drawing
        expected = annotation_files([sample_face(seed, i, num_images).labels for i in range(num_images)])
        _refuse_different_annotations(out, expected, num_images)
    _refuse_stray_images(out / IMAGE_DIR, num_images)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    labels = _render_all(out / IMAGE_DIR, seed=seed, num_images=num_images, workers=workers)
    for name, data in annotation_files(labels).items():
        _write_atomic(out / name, data)
    return out


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celeba-dist synth",
        description="Write a synthetic CelebA (drawn faces) in the exact official file layout.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path,
                        help="folder to write (laid out like the official release)")
    parser.add_argument("--num-images", metavar="N", type=_int_at_least(1), required=True,
                        help=f"how many images (1..{MAX_IMAGES})")
    parser.add_argument("--seed", metavar="S", type=_int_at_least(0), default=0,
                        help="same seed, same bytes (default 0)")
    parser.add_argument("--workers", metavar="W", type=_int_at_least(1), default=1,
                        help="processes drawing images (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``celeba-dist synth OUT_DIR --num-images N [--seed S] [--workers W]``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
    start = time.perf_counter()
    try:
        out = make_synthetic_celeba(args.out_dir, num_images=args.num_images, seed=args.seed, workers=args.workers)
    except (ValueError, OSError) as error:  # DifferentCelebAError is an OSError
        log.error("%s", error)
        return 1
    seconds = time.perf_counter() - start
    log.info("wrote %d images to %s in %.1f s (%.0f images/s)", args.num_images, out, seconds,
             args.num_images / seconds)
    return 0
