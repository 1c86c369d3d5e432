"""Sampling the labels: identities, the 40 attributes with CelebA-like rates and correlations, the look.

Image ``i`` of a set of N depends only on ``(seed, i, N)``: every ``random.Random`` here is seeded by a
string key that starts with :data:`KEY`.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np

from celeba_dist.attributes import CELEBA_ATTRIBUTES
from celeba_dist.synthetic.colors import RGB, jitter, mix, scaled

# Official split sizes (train, valid, test); a synthetic set of N images keeps their fractions.
OFFICIAL_SPLIT_SIZES = (162_770, 19_867, 19_962)
IMAGES_PER_IDENTITY = 20  # CelebA: 202599 images of 10177 identities; fewer in small sets
KEY = "celeba-synth-v1"  # prefix of every random.Random seed string; bump to change all images
FACE_CENTER = (89.0, 125.0)  # image position of the face-local origin (between eyes and mouth)

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
    random.Random(f"{KEY}/{seed}/identities").shuffle(ids)
    starts = np.cumsum([0, *sizes]).tolist()
    return tuple(tuple(ids[a:b]) for a, b in zip(starts[:-1], starts[1:]))


def _partition_of(index: int, num_images: int) -> int:
    n_train, n_valid, _ = split_counts(num_images)
    return 0 if index < n_train else 1 if index < n_train + n_valid else 2


def _coin(rnd: random.Random, male: bool) -> Callable[[float, float], bool]:
    """A coin toss ``p(pm, pf)``: true with probability ``pm`` for a man, ``pf`` for a woman."""
    return lambda pm, pf: rnd.random() < (pm if male else pf)


@functools.lru_cache(maxsize=65_536)
def sample_identity(seed: int, identity: int) -> Identity:
    """The traits of one identity; the same for every image of it."""
    rnd = random.Random(f"{KEY}/{seed}/identity/{identity}")
    male = rnd.random() < 0.417
    young = rnd.random() < (0.67 if male else 0.85)
    p = _coin(rnd, male)
    traits = (
        ("Big_Nose", p(0.45, 0.08)), ("Pointy_Nose", p(0.18, 0.35)), ("Oval_Face", p(0.22, 0.33)),
        ("Chubby", p(0.12, 0.015)), ("Double_Chin", p(0.09, 0.015)),
    )
    return Identity(
        male=male, young=young, skin=jitter(rnd, rnd.choice(_SKIN_TONES), 6),
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
    p = _coin(rnd, male)
    a = dict.fromkeys(CELEBA_ATTRIBUTES, False)
    a.update(ident.traits)
    a["Male"], a["Young"] = male, young
    hair = _sample_hair(rnd, a, p)
    _sample_beard(rnd, a, male)
    _sample_expression(rnd, a, p)
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


def _sample_hair(rnd: random.Random, a: dict[str, bool], p: Callable[[float, float], bool]) -> str | None:
    """Hat, baldness, hair colour and style into ``a``; returns the hair class (None: bald)."""
    male, young = a["Male"], a["Young"]
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
    return hair


def _sample_beard(rnd: random.Random, a: dict[str, bool], male: bool) -> None:
    """Mustache, Goatee, No_Beard (-1 also for a beard along the jaw), stubble and sideburns into ``a``."""
    beard = rnd.random() if male else 0.0
    a["Mustache"] = 0.55 <= beard < 0.62 or 0.71 <= beard < 0.81
    a["Goatee"] = 0.62 <= beard < 0.81
    a["No_Beard"] = beard < 0.55
    a["5_o_Clock_Shadow"] = male and rnd.random() < (0.3 if a["No_Beard"] else 0.15)
    a["Sideburns"] = male and rnd.random() < (0.04 if a["No_Beard"] else 0.35)


def _sample_expression(rnd: random.Random, a: dict[str, bool], p: Callable[[float, float], bool]) -> None:
    """Smiling and what goes with it (an open mouth, high cheekbones, narrowed eyes) into ``a``."""
    a["Smiling"] = p(0.41, 0.53)
    a["Mouth_Slightly_Open"] = rnd.random() < (0.7 if a["Smiling"] else 0.28)
    a["High_Cheekbones"] = rnd.random() < (0.78 if a["Smiling"] else 0.16)
    a["Narrow_Eyes"] = rnd.random() < (0.16 if a["Smiling"] else 0.07)


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


def _sample_glasses(rnd: random.Random, a: dict[str, bool]) -> tuple[bool, RGB, float, float] | None:
    if not a["Eyeglasses"]:
        return None
    frame = jitter(rnd, rnd.choice(((25, 25, 25), (70, 40, 25), (40, 40, 70))), 10)
    return rnd.random() < 0.33, frame, rnd.uniform(12, 14), rnd.uniform(9, 11)


def _sample_hat(rnd: random.Random, a: dict[str, bool]) -> tuple[str, RGB, float] | None:
    if not a["Wearing_Hat"]:
        return None
    return rnd.choice(("brim", "cap")), jitter(rnd, rnd.choice(_HAT_COLORS), 15), rnd.uniform(38, 50)


def _sample_look(rnd: random.Random, ident: Identity, a: dict[str, bool], hair: str | None) -> Look:
    skin = jitter(rnd, _PALE_SKIN, 4) if a["Pale_Skin"] else ident.skin
    hair_rgb = None if hair is None else jitter(rnd, scaled(_HAIR_COLORS[hair], rnd.uniform(0.92, 1.08)), 8)
    dark = jitter(rnd, (45, 35, 30), 12)
    beard_color = scaled(hair_rgb, 0.65) if hair_rgb else dark
    mouth = _sample_mouth(rnd, a)
    lipstick = jitter(rnd, rnd.choice(_LIPSTICKS), 10)
    natural_lips = scaled(mix(skin, (160, 70, 70), 0.45), 0.85)
    glasses, hat = _sample_glasses(rnd, a), _sample_hat(rnd, a)
    return Look(
        pose=(rnd.uniform(-6, 6), rnd.uniform(-6, 6), rnd.uniform(0.92, 1.08), math.radians(rnd.uniform(-8, 8))),
        skin=skin, half_width=ident.half_width, top=rnd.uniform(70, 74),
        chin=rnd.uniform(60, 64) if ident.male else rnd.uniform(57, 61),
        jaw_power=ident.jaw_power, chin_taper=ident.chin_taper, hair=hair_rgb,
        long_hair=0.0 if ident.male else rnd.uniform(60, 100), bangs=a["Bangs"],
        hairline=rnd.uniform(-50, -46),
        eye_gap=ident.eye_gap, eye_height=rnd.uniform(3.5, 4.8), eye_color=ident.eye_color,
        brow_width=rnd.uniform(4, 5.5) if ident.male else rnd.uniform(2.5, 3.5),
        brow_color=scaled(hair_rgb, 0.7) if hair_rgb else dark,
        lip_color=lipstick if a["Wearing_Lipstick"] else natural_lips,
        mustache=a["Mustache"], goatee=a["Goatee"], jaw_beard=not (a["No_Beard"] or a["Mustache"] or a["Goatee"]),
        beard_color=beard_color, glasses=glasses, hat=hat,
        clothes=(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)), **mouth,  # type: ignore[arg-type]
    )


def _to_image(pose: tuple[float, float, float, float], u: float, v: float) -> tuple[float, float]:
    dx, dy, scale, angle = pose
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    return FACE_CENTER[0] + dx + c * u - s * v, FACE_CENTER[1] + dy + s * u + c * v


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
    rnd = random.Random(f"{KEY}/{seed}/image/{index}")
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
