"""``celeba_dist.load``: an export folder, a checkpoint or a run folder → (classifier, preprocess).

The classifier is the trained network in eval mode, wrapped so that it returns per-attribute
probabilities (``.attributes`` names the columns, ``.decide`` applies the tuned thresholds);
``preprocess`` turns image bytes, a path or a PIL image (or a list of them) into the normalised
tensor the network was evaluated on, through the run's own eval transform. Checkpoints are read
with ``weights_only=True`` (:func:`celeba_dist.train.checkpoint.load_checkpoint`), exports with
``safetensors``: nothing is unpickled.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from celeba_dist.config import Config, config_from_tree
from celeba_dist.data.transforms import build_transform, normalize_batch
from celeba_dist.train.checkpoint import BEST, load_checkpoint
from celeba_dist.train.ema import RAW, selected_weights
from celeba_dist.train.engine import predict_probs
from celeba_dist.train.losses import LOSSES

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
FORMAT = "celeba-dist-export"


@dataclass
class Trained:
    """What any of the three sources gives: the config, output attributes, thresholds and weights."""

    cfg: Config
    attributes: list[str]
    thresholds: list[float]
    state_dict: dict[str, torch.Tensor]  # the weights the run selected (its EMA's where validation chose them)
    source: Path
    weights: str = RAW  # raw | ema: which of a run's weights these are
    step: int | None = None  # the optimizer step the weights are from (None: an export that predates it)


def read_trained(source: str | Path, overrides: Sequence[str] = ()) -> Trained:
    """An export folder (``config.json`` + ``model.safetensors``), a run folder (its ``best.pt``) or a
    checkpoint file."""
    path = Path(source)
    if (path / EXPORT_CONFIG).is_file():
        from safetensors.torch import load_file

        meta = json.loads((path / EXPORT_CONFIG).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path / EXPORT_CONFIG} is not a celeba-dist export (format {meta.get('format')!r})")
        cfg = config_from_tree(meta["config"], ["model.pretrained=none", *overrides])
        return Trained(cfg, meta["attributes"], meta["thresholds"], load_file(path / EXPORT_WEIGHTS), path,
                       meta.get("weights", RAW), meta.get("step"))
    if path.is_dir():
        path = path / "checkpoints" / BEST
        if not path.is_file():
            raise FileNotFoundError(f"{path}: neither an export folder ({EXPORT_CONFIG}) nor a run with a best checkpoint")
    ckpt = load_checkpoint(path)
    cfg = config_from_tree(ckpt["config"], ["model.pretrained=none", *overrides])
    attributes = ckpt["attributes"]
    return Trained(cfg, attributes, ckpt.get("thresholds") or [0.5] * len(attributes), selected_weights(ckpt), path,
                   ckpt.get("weights") or RAW, ckpt["state"].get("global_step"))


class AttributeClassifier(torch.nn.Module):
    """The trained network → probabilities per attribute (the training loss's own mapping of its outputs),
    averaged with the mirrored image's under ``tta="flip"`` (the run's ``eval.tta``)."""

    def __init__(self, net: torch.nn.Module, *, attributes: list[str], thresholds: list[float], loss: str,
                 tta: str = "none"):
        super().__init__()
        self.net, self.attributes, self.loss, self.tta = net, list(attributes), loss, tta
        self.register_buffer("thresholds", torch.tensor(thresholds, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return predict_probs(self.net, x, LOSSES[self.loss].to_prob, tta=self.tta)

    def decide(self, probs: torch.Tensor) -> torch.Tensor:
        """0/1 per attribute with the thresholds the run chose (0.5 unless it tuned them)."""
        return (probs >= self.thresholds).int()


class Preprocess:
    """Image bytes, a path or a PIL image → normalised float tensor (3, H, W); a list → (B, 3, H, W)."""

    def __init__(self, cfg: Config):
        self.transform = build_transform(cfg.data.transform, image_size=cfg.data.image_size, train=False)
        self.normalize, self.image_size = cfg.data.normalize, tuple(cfg.data.image_size)

    def __call__(self, image: Any) -> torch.Tensor:
        if isinstance(image, (list, tuple)):
            return torch.stack([self(one) for one in image])
        uint8 = self.transform(_as_bytes(image), random.Random(0))
        return normalize_batch(uint8.unsqueeze(0), self.normalize)[0]


def _as_bytes(image: Any) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")  # lossless: the transform decodes it as it is
        return buf.getvalue()
    raise TypeError(f"preprocess takes image bytes, a path or a PIL image, not {type(image).__name__}")


def build_classifier(trained: Trained) -> AttributeClassifier:
    """The network for inference: in eval mode, and its parameters need no gradients, so probabilities
    computed outside ``torch.no_grad()`` (a notebook's ``model(x)``) hold no autograd graph."""
    from celeba_dist.train.build import build_model_for

    net = build_model_for(trained.cfg, len(trained.attributes))
    net.load_state_dict(trained.state_dict)
    net.requires_grad_(False)
    return AttributeClassifier(net, attributes=trained.attributes, thresholds=trained.thresholds,
                               loss=trained.cfg.loss.name, tta=trained.cfg.eval.tta).eval()


def load(source: str | Path, *, device: str | torch.device = "cpu") -> tuple[AttributeClassifier, Callable]:
    """(classifier in eval mode on ``device``, preprocess) from an export folder, a run folder or a checkpoint."""
    trained = read_trained(source)
    return build_classifier(trained).to(device), Preprocess(trained.cfg)
