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

Modules: :mod:`~celeba_dist.synthetic.labels` samples identities, attributes and looks;
:mod:`~celeba_dist.synthetic.drawing` paints a look and :mod:`~celeba_dist.synthetic.photo` turns it into
a JPEG; :mod:`~celeba_dist.synthetic.formats` holds the official layout and text files;
:mod:`~celeba_dist.synthetic.writing` fills a folder and :mod:`~celeba_dist.synthetic.cli` is the command.
"""
from __future__ import annotations

from celeba_dist.synthetic.cli import build_parser, main
from celeba_dist.synthetic.colors import RGB
from celeba_dist.synthetic.drawing import render_face
from celeba_dist.synthetic.formats import (
    ANNOTATION_FILES, ATTR_FILE, BBOX_FILE, IDENTITY_FILE, IMAGE_DIR, IMAGE_HEIGHT, IMAGE_WIDTH, JPEG_QUALITY,
    LANDMARK_NAMES, LANDMARKS_FILE, MAX_IMAGES, PARTITION_FILE, annotation_files,
)
from celeba_dist.synthetic.labels import (
    IMAGES_PER_IDENTITY, OFFICIAL_SPLIT_SIZES, Face, Identity, Labels, Look, sample_face, sample_identity,
    split_counts,
)
from celeba_dist.synthetic.writing import DifferentCelebAError, make_synthetic_celeba

__all__ = [
    "ANNOTATION_FILES", "ATTR_FILE", "BBOX_FILE", "IDENTITY_FILE", "IMAGE_DIR", "IMAGE_HEIGHT", "IMAGE_WIDTH",
    "IMAGES_PER_IDENTITY", "JPEG_QUALITY", "LANDMARK_NAMES", "LANDMARKS_FILE", "MAX_IMAGES",
    "OFFICIAL_SPLIT_SIZES", "PARTITION_FILE", "RGB", "DifferentCelebAError", "Face", "Identity", "Labels",
    "Look", "annotation_files", "build_parser", "main", "make_synthetic_celeba", "render_face", "sample_face",
    "sample_identity", "split_counts",
]
