"""The model registry and the one builder the training code calls: ``build_model``.

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

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from celeba_dist.models import pretrained as pretrained_mod

log = logging.getLogger(__name__)

TORCHVISION_PREFIX = "torchvision:"
# Shown by ``celeba-dist models``; any other torchvision classifier name works too.
COMMON_TORCHVISION = ("resnet18", "resnet50", "resnext50_32x4d", "convnext_tiny", "efficientnet_b0", "vit_b_16")
_RESERVED_ARGS = ("num_attributes", "imagenet")


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model: its default input size, options and ImageNet weights.

    ``options`` maps each option to its default; ``forwards_options`` is True for
    ``torchvision:<name>``, whose options go to torchvision's builder. The input normalisation a
    model expects follows from its weights (:func:`expected_normalize`).
    """

    name: str
    input_size: tuple[int, int]  # (H, W)
    description: str
    options: dict[str, object]
    factory: Callable[..., nn.Module] = field(repr=False, compare=False)
    supports_imagenet: bool = False
    forwards_options: bool = False
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # option -> its valid values


MODELS: dict[str, ModelSpec] = {}
PREFIXES: dict[str, Callable[[str], ModelSpec]] = {}  # "torchvision:" -> the spec of "torchvision:<name>"


def expected_normalize(pretrained: str) -> str:
    """The ``data.normalize`` a model's inputs need: ImageNet weights were trained on ImageNet-normalised
    pixels; a model trained here from scratch (or from a weights file made here) takes pixels / 255."""
    return "imagenet" if pretrained_mod.parse_imagenet(pretrained) is not None else "unit"


def register_prefix(prefix: str, spec_of: Callable[[str], ModelSpec]) -> None:
    """Names ``<prefix><name>`` resolve through ``spec_of(name)`` (e.g. ``torchvision:<name>``)."""
    PREFIXES[prefix] = spec_of


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
    choices: dict[str, tuple[str, ...]] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``factory(*, num_attributes, [imagenet], **options)`` under ``name``;
    ``choices`` lists the valid values of options that take one of a few names (checked with the config)."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        options, has_imagenet, _ = _factory_options(factory)
        MODELS[name] = ModelSpec(
            name=name, input_size=tuple(input_size), description=description, options=options,
            factory=factory, supports_imagenet=has_imagenet, choices=dict(choices or {}),
        )
        return factory

    return decorator


def list_models() -> list[str]:
    """Registered model names (``torchvision:<name>`` is accepted as well but not listed)."""
    return sorted(MODELS)


def model_spec(name: str) -> ModelSpec:
    """The spec of a registered model or of ``torchvision:<name>``; unknown names raise ValueError."""
    for prefix, spec_of in PREFIXES.items():
        if name.startswith(prefix):
            return spec_of(name[len(prefix):])
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
