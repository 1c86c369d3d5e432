"""The 40 CelebA attribute names, in the order of ``list_attr_celeba.txt``, and the aligned images' size."""
from __future__ import annotations

CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald",
    "Bangs", "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair",
    "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)

ALIGNED_IMAGE_SIZE: tuple[int, int] = (178, 218)  # (W, H) of every image in img_align_celeba

# Attributes the synthetic CelebA really draws into the pixels (celeba_dist.synthetic);
# the others follow plausible rates and correlations but leave no trace in the image.
DRAWN_ATTRIBUTES: tuple[str, ...] = (
    "Smiling", "Mouth_Slightly_Open", "Eyeglasses", "Wearing_Hat", "Bald", "Bangs",
    "Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair", "Mustache", "Goatee",
    "No_Beard", "Pale_Skin", "Wearing_Lipstick", "Male",
)


def resolve_attributes(names: str | list[str] | tuple[str, ...], available: list[str] | tuple[str, ...] = CELEBA_ATTRIBUTES) -> list[str]:
    """Turn ``"all"``, ``"drawn"`` or a list of names into a validated list of names.

    Raises ``ValueError`` naming the unknown attribute and the valid choices.
    """
    if isinstance(names, str):
        if names == "all":
            return list(available)
        if names == "drawn":
            return [a for a in available if a in DRAWN_ATTRIBUTES]
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown}; valid: 'all', 'drawn' or names from {list(available)}")
    if len(set(names)) != len(names):
        raise ValueError(f"attribute list has duplicates: {list(names)}")
    return list(names)
