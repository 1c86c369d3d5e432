"""Model registry and the one builder the training code calls: ``build_model``.

Every model maps images ``(B, 3, H, W)`` to attribute LOGITS ``(B, num_attributes)``; the loss
applies the sigmoid (BCE-with-logits). A model is a factory function registered under a name::

    @register_model("simple_cnn", input_size=(64, 64), description="...")
    def build_simple_cnn(*, num_attributes: int, dropout: float = 0.5) -> nn.Module: ...

The factory's keyword-only arguments (other than ``num_attributes`` and ``imagenet``) are the
model's options, so ``build_model`` can reject an unknown option by name. A factory that also
takes ``imagenet`` (the name of a torchvision weights enum member, or None) supports
``pretrained="imagenet"``. Any torchvision classifier is available as ``torchvision:<name>``.
"""
from __future__ import annotations

import argparse
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
TORCHVISION_PREFIX = "torchvision:"
# Shown by ``celeba-dist models``; any other torchvision classifier name works too.
COMMON_TORCHVISION = ("resnet18", "resnet50", "resnext50_32x4d", "convnext_tiny", "efficientnet_b0", "vit_b_16")
_RESERVED_ARGS = ("num_attributes", "imagenet")


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model: its default input size, options and normalisation.

    ``mean``/``std`` are the per-channel input normalisation the model expects after scaling
    pixels to [0, 1] (None: no normalisation). ``options`` maps each option to its default;
    ``forwards_options`` is True for ``torchvision:<name>``, whose options go to torchvision's builder.
    """

    name: str
    input_size: tuple[int, int]  # (H, W)
    description: str
    options: dict[str, object]
    factory: Callable[..., nn.Module] = field(repr=False, compare=False)
    supports_imagenet: bool = False
    forwards_options: bool = False
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


MODELS: dict[str, ModelSpec] = {}


def _factory_options(factory: Callable[..., nn.Module]) -> tuple[dict[str, object], bool, bool]:
    """(options with defaults, accepts ``imagenet``, accepts ``**kwargs``) from a factory's signature."""
    params = inspect.signature(factory).parameters.values()
    options = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _RESERVED_ARGS}
    has_imagenet = any(p.name == "imagenet" for p in params)
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    return options, has_imagenet, has_var_kw


def register_model(
    name: str,
    *,
    input_size: tuple[int, int],
    description: str,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``factory(*, num_attributes, [imagenet], **options)`` under ``name``."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        options, has_imagenet, _ = _factory_options(factory)
        MODELS[name] = ModelSpec(
            name=name, input_size=tuple(input_size), description=description, options=options,
            factory=factory, supports_imagenet=has_imagenet, mean=mean, std=std,
        )
        return factory

    return decorator


def list_models() -> list[str]:
    """Registered model names (``torchvision:<name>`` is accepted as well but not listed)."""
    return sorted(MODELS)


def model_spec(name: str) -> ModelSpec:
    """The spec of a registered model or of ``torchvision:<name>``; unknown names raise ValueError."""
    if name.startswith(TORCHVISION_PREFIX):
        return torchvision_any.torchvision_spec(name[len(TORCHVISION_PREFIX):])
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; valid: {list_models()} or 'torchvision:<name>' "
            f"for any torchvision classifier (e.g. {', '.join(TORCHVISION_PREFIX + n for n in COMMON_TORCHVISION[:3])})"
        )
    return MODELS[name]


def _check_options(spec: ModelSpec, options: dict[str, object]) -> None:
    """Raise ValueError naming any option the model's factory does not take."""
    unknown = sorted(set(options) - set(spec.options))
    if unknown and not spec.forwards_options:
        valid = ", ".join(f"{k}={v!r}" for k, v in spec.options.items()) or "none"
        raise ValueError(f"unknown option(s) {unknown} for model {spec.name!r}; valid options: {valid}")


def build_model(name: str, *, num_attributes: int, pretrained: str = "none", **options: object) -> nn.Module:
    """Build model ``name`` returning logits (B, num_attributes).

    ``pretrained``: ``"none"`` (random init), ``"imagenet"`` / ``"imagenet:<WEIGHTS_TAG>"``
    (torchvision's ImageNet weights for the trunk, from the torch hub cache; the head stays random),
    or a path to a state-dict file (plain, or a dict with a ``model`` key).
    """
    spec = model_spec(name)
    _check_options(spec, options)
    if num_attributes < 1:
        raise ValueError(f"num_attributes must be >= 1, got {num_attributes}")
    imagenet_tag = pretrained_mod.parse_imagenet(pretrained)
    if imagenet_tag is not None:
        if not spec.supports_imagenet:
            raise ValueError(
                f"model {spec.name!r} has no ImageNet weights (it is trained from scratch); "
                "use pretrained='none' or a path to a state-dict file"
            )
        options = {**options, "imagenet": imagenet_tag}
    model = spec.factory(num_attributes=num_attributes, **options)
    if imagenet_tag is None and pretrained != "none":
        pretrained_mod.load_weights_file(model, pretrained, num_attributes=num_attributes)
    total, trainable = count_parameters(model)
    log.info("built %s (pretrained=%s): %s parameters, %s trainable", spec.name, pretrained, f"{total:,}", f"{trainable:,}")
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer should update (frozen ones have ``requires_grad=False``)."""
    return [p for p in model.parameters() if p.requires_grad]


def _count_on_meta(name: str, num_attributes: int) -> tuple[int, int]:
    """Parameter counts without allocating or initialising weights (built on the meta device)."""
    with torch.device("meta"):
        return count_parameters(build_model(name, num_attributes=num_attributes))


def list_main(argv: list[str] | None = None) -> int:
    """``celeba-dist models``: every model with its parameter count and default input size."""
    parser = argparse.ArgumentParser(
        prog="celeba-dist models", description="List every model with its parameter count and default input size.",
    )
    parser.add_argument("--num-attributes", type=int, default=40, help="size of the head (default: 40)")
    parser.add_argument(
        "--torchvision", nargs="*", default=list(COMMON_TORCHVISION), metavar="NAME",
        help="torchvision models to count as examples of torchvision:<name>",
    )
    args = parser.parse_args(argv)
    names = list_models() + [TORCHVISION_PREFIX + n for n in args.torchvision]
    rows = [("model", "parameters", "trainable", "input HxW", "ImageNet", "description")]
    for name in names:
        spec = model_spec(name)
        total, trainable = _count_on_meta(name, args.num_attributes)
        h, w = spec.input_size
        rows.append((name, f"{total:,}", f"{trainable:,}", f"{h}x{w}", "yes" if spec.supports_imagenet else "no", spec.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(wd) if i == 0 else cell.rjust(wd) for i, (cell, wd) in enumerate(zip(row, widths))) + "  " + row[-1])
    print(
        f"\nParameter counts are for {args.num_attributes} attributes. Any torchvision classifier works as "
        f"'torchvision:<name>' ({len(torchvision_any.torchvision_names())} names, e.g. "
        f"{', '.join(torchvision_any.torchvision_names()[:6])}, ...); its last classification layer is replaced."
    )
    return 0


# Imported last: the model modules register themselves with ``register_model`` defined above.
from celeba_dist.models import pretrained as pretrained_mod  # noqa: E402
from celeba_dist.models import celeb_cnn, lstm_attn, resnext, simple_cnn, torchvision_any  # noqa: E402,F401

__all__ = [
    "MODELS", "ModelSpec", "IMAGENET_MEAN", "IMAGENET_STD", "build_model", "count_parameters",
    "list_main", "list_models", "model_spec", "register_model", "trainable_parameters",
]
