"""``torchvision:<name>``: any torchvision classification model with its last layer made N-way.

The head is found generically: the last Linear (or, for SqueezeNet, 1x1 Conv2d) with 1000 outputs,
wherever the architecture keeps it (``fc``, ``classifier[-1]``, ``heads.head``, ``head``). Options
are passed to torchvision's builder (e.g. ``dropout`` for EfficientNet). The default input size
is the crop size of the model's DEFAULT ImageNet weights (224 for most, 299 for Inception-v3).
"""
from __future__ import annotations

import difflib
import functools
import inspect

from torch import nn

from celeba_dist.models.pretrained import classifier_name, imagenet_weights, torchvision_model, tv_models
from celeba_dist.models.registry import TORCHVISION_PREFIX, ModelSpec, register_prefix

IMAGENET_CLASSES = 1000


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """Names of torchvision's image classification models."""
    return tuple(sorted(tv_models().list_models(module=tv_models())))


def _default_input_size(name: str) -> tuple[int, int]:
    """(H, W) of the centre crop torchvision evaluates its DEFAULT weights at."""
    crop = imagenet_weights(name).transforms.keywords.get("crop_size", 224)
    return (crop, crop)


def torchvision_spec(name: str) -> ModelSpec:
    """The ModelSpec of ``torchvision:<name>``; unknown names raise ValueError."""
    if name not in torchvision_names():
        close = difflib.get_close_matches(name, torchvision_names(), n=5, cutoff=0.5)
        raise ValueError(
            f"unknown torchvision model {name!r}; closest: {close or 'none'}; others include "
            f"{', '.join(torchvision_names()[:8])}, ... ({len(torchvision_names())} in all: "
            "torchvision.models.list_models(module=torchvision.models))"
        )
    return ModelSpec(
        name=TORCHVISION_PREFIX + name, input_size=_default_input_size(name),
        description=f"torchvision {name}, last classification layer replaced",
        options={}, factory=functools.partial(build_torchvision, name),
        supports_imagenet=True, forwards_options=True,
    )


def replace_classifier(model: nn.Module, num_outputs: int) -> str:
    """Swap the 1000-way ImageNet layer for a fresh ``num_outputs``-way one; returns its name."""
    name = classifier_name(model, IMAGENET_CLASSES)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_outputs)
    else:  # SqueezeNet's 1x1 conv classifier
        new = nn.Conv2d(old.in_channels, num_outputs, kernel_size=1)
    setattr(parent, child, new.to(old.weight.device))
    if isinstance(parent, nn.Sequential) and child.isdigit() and int(child) + 1 < len(parent):
        if isinstance(parent[int(child) + 1], nn.ReLU):  # SqueezeNet: a ReLU would clamp logits to >= 0
            parent[int(child) + 1] = nn.Identity()
    return name


def _drop_aux_heads(model: nn.Module) -> None:
    """Inception-v3/GoogLeNet: drop the auxiliary classifiers so forward returns plain logits."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)


def build_torchvision(name: str, *, num_attributes: int, imagenet: str | None = None, **options: object) -> nn.Module:
    """torchvision model ``name`` with an N-way head; ``options`` go to torchvision's builder."""
    if imagenet is None and name.startswith("vit_"):
        # Without weights a ViT is built for 224; match the default input size (518 for vit_h_14).
        options = {"image_size": _default_input_size(name)[0], **options}
    if imagenet is None and name in ("googlenet", "inception_v3"):
        # their truncated-normal init, said explicitly: left unset, torchvision warns (FutureWarning) at every build
        options = {"init_weights": True, **options}
    try:
        model = torchvision_model(name, imagenet=imagenet, **options)
    except TypeError as exc:
        raise ValueError(f"torchvision model {name!r} rejected option(s) {sorted(options)}: {exc}") from exc
    _check_options(name, model, options)
    _drop_aux_heads(model)
    replace_classifier(model, num_attributes)
    return model


def _check_options(name: str, model: nn.Module, options: dict[str, object]) -> None:
    """Reject options the model class does not name: some (MobileNetV3) swallow unknown ``**kwargs``."""
    params = inspect.signature(type(model).__init__).parameters.values()
    valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "num_classes")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for torchvision model {name!r}; valid: {valid}")


register_prefix(TORCHVISION_PREFIX, torchvision_spec)
