"""Pretrained weights: torchvision's ImageNet weights through the torch hub cache, and local files.

ImageNet weights live where torchvision itself keeps them,
``torch.hub.get_dir()/checkpoints/<file name of the weights URL>`` (``$TORCH_HOME/hub/checkpoints``
when ``TORCH_HOME`` is set). A cached file is loaded without touching the network. A missing
file is downloaded once through torchvision unless ``CELEBA_DIST_OFFLINE`` or ``HF_HUB_OFFLINE``
is set; either way a missing file ends in ``WeightsUnavailableError`` naming the file, the
folder and the URL, never in silently random weights. Compute nodes without internet should
pre-fill the cache (or share one through ``TORCH_HOME``) and set ``CELEBA_DIST_OFFLINE=1``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import nn

from celeba_dist.safeload import UnsafeFileError, load_weights_only

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

log = logging.getLogger(__name__)

OFFLINE_ENV_VARS = ("CELEBA_DIST_OFFLINE", "HF_HUB_OFFLINE")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DDP / torch.compile
_SHOWN_KEYS = 5


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights are neither in the torch hub cache nor downloadable."""


def tv_models():
    """``torchvision.models``, imported on first use: importing torchvision imports torch._dynamo (about
    1.5 s of every process's start-up on a 2-core machine), which a run of a model of this package's own
    never needs."""
    import torchvision.models

    return torchvision.models


def parse_imagenet(pretrained: str) -> str | None:
    """The weights tag for ``"imagenet"`` (``"DEFAULT"``) or ``"imagenet:<TAG>"``; None otherwise."""
    if pretrained == "imagenet":
        return "DEFAULT"
    if pretrained.startswith("imagenet:"):
        return pretrained.split(":", 1)[1]
    return None


def imagenet_weights(name: str, tag: str = "DEFAULT") -> WeightsEnum:
    """torchvision's weights enum member ``tag`` (e.g. ``DEFAULT``, ``IMAGENET1K_V1``) for model ``name``."""
    enum = tv_models().get_model_weights(name)
    try:
        return enum[tag]
    except KeyError:
        raise ValueError(f"torchvision {name!r} has no weights {tag!r}; valid: {list(enum.__members__)}") from None


def cached_weights_path(weights: WeightsEnum) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps (and looks for) this weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def is_offline() -> bool:
    """True when an offline flag (``CELEBA_DIST_OFFLINE``, ``HF_HUB_OFFLINE``) is set."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in OFFLINE_ENV_VARS)


def _unavailable(weights: WeightsEnum, path: Path, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"ImageNet weights {weights} are not cached and {reason}. On a machine with internet, fetch "
        f"{weights.url} and put it at {path} (file name {path.name!r} exactly; the folder is "
        f"$TORCH_HOME/hub/checkpoints, TORCH_HOME={os.environ.get('TORCH_HOME', '<unset>')}). "
        "Or use pretrained='none'."
    )


def ensure_cached(weights: WeightsEnum) -> Path:
    """Return the cached weights file, downloading it once through torchvision if allowed."""
    path = cached_weights_path(weights)
    if path.is_file():
        return path
    if is_offline():
        raise _unavailable(weights, path, f"offline mode is on ({' or '.join(OFFLINE_ENV_VARS)} is set)")
    log.info("downloading %s to %s", weights.url, path)
    try:
        weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash is a RuntimeError
        raise _unavailable(weights, path, f"the download failed ({exc!r})") from exc
    return path


def torchvision_model(name: str, *, imagenet: str | None = None, **kwargs: object) -> nn.Module:
    """torchvision's model ``name`` with random weights, or with ImageNet weights ``imagenet`` (a tag)."""
    if imagenet is None:
        return tv_models().get_model(name, weights=None, **kwargs)
    weights = imagenet_weights(name, imagenet)
    path = ensure_cached(weights)
    log.info("loading ImageNet weights %s from %s", weights, path)
    # The builder loads through torch.hub, which finds the cached file and does not download.
    return tv_models().get_model(name, weights=weights, **kwargs)


def classifier_name(model: nn.Module, num_outputs: int) -> str:
    """Qualified name of the last Linear (or 1x1 Conv2d) producing ``num_outputs`` features: the head."""
    found = None
    for name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) and module.out_features == num_outputs
        is_conv1x1 = isinstance(module, nn.Conv2d) and module.out_channels == num_outputs and module.kernel_size == (1, 1)
        if is_linear or is_conv1x1:
            found = name
    if found is None:
        raise ValueError(f"{type(model).__name__} has no Linear/1x1-Conv layer with {num_outputs} outputs")
    return found


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from ``path``: a plain one, the ``model``/``state_dict`` entry of a checkpoint, or a
    ``.safetensors`` file; read without running anything from the file (a pickle that would is refused)."""
    if str(path).endswith(".safetensors"):  # e.g. a celeba-dist export's model.safetensors
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        try:
            obj = load_weights_only(path, what="model.pretrained")
        except UnsafeFileError as exc:
            raise ValueError(str(exc)) from None
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a state dict (a mapping of names to tensors, or one under a 'model' key)")
    state = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN_KEYS]) + (", ..." if len(keys) > _SHOWN_KEYS else "")


def load_weights_file(model: nn.Module, path: str | os.PathLike[str], *, num_attributes: int) -> None:
    """Load a state-dict file into ``model``; head weights of another size are skipped (head stays random).

    Raises FileNotFoundError for a missing file and ValueError listing missing, unexpected or
    mis-shaped keys for a file of another architecture.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"pretrained={str(path)!r} is not 'none', 'imagenet', 'imagenet:<TAG>' or an existing file")
    state = read_state_dict(path)
    own = model.state_dict()
    head = classifier_name(model, num_attributes) + "."
    resized = [k for k in state if k in own and state[k].shape != own[k].shape]
    skipped = [k for k in resized if k.startswith(head)]
    if skipped:
        log.warning("%s: head has another size; skipping %s (head stays randomly initialised)", path, skipped)
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = sorted(set(own) - set(state) - set(skipped))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in resized if k not in skipped]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: {len(missing)} missing keys ({_examples(missing)}); "
            f"{len(unexpected)} unexpected keys ({_examples(unexpected)}); "
            f"{len(mismatched)} keys of another shape, file vs model ({_examples(mismatched)})"
        )
    model.load_state_dict(state, strict=False)  # strict apart from the skipped head keys, checked above
    log.info("loaded %d tensors from %s", len(state), path)
