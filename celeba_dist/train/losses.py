"""Loss registry. Every loss maps model outputs to a probability-like score, so that decisions
(score >= threshold, 0.5 by default) and metrics do not depend on which loss trained the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class MSEPlusMinusOne(nn.Module):
    """MSE against targets mapped from {0, 1} to {-1, +1} (the ResNeXt source's recipe)."""

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(outputs, targets * 2.0 - 1.0)


@dataclass(frozen=True)
class LossSpec:
    build: Callable[[torch.Tensor | None], nn.Module]  # positive weights (A,) or None
    to_prob: Callable[[torch.Tensor], torch.Tensor]  # outputs -> scores in [0, 1]; 0.5 is the boundary
    description: str


def _bce(pos_weight: torch.Tensor | None) -> nn.Module:
    return nn.BCEWithLogitsLoss(pos_weight=pos_weight)


def _mse(pos_weight: torch.Tensor | None) -> nn.Module:
    if pos_weight is not None:
        raise ValueError("loss.pos_weight is only defined for loss.name=bce")
    return MSEPlusMinusOne()


LOSSES: dict[str, LossSpec] = {
    "bce": LossSpec(_bce, torch.sigmoid, "binary cross-entropy on logits; decision at logit 0"),
    "mse_pm1": LossSpec(_mse, lambda out: ((out + 1.0) / 2.0).clamp(0.0, 1.0),
                        "MSE on -1/+1 targets; decision at output 0"),
}


def build_loss(name: str, *, pos_weight: torch.Tensor | None = None) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {sorted(LOSSES)}")
    return LOSSES[name].build(pos_weight)


def positive_weights(rates: list[float]) -> torch.Tensor:
    """neg/pos ratio per attribute from positive rates, clipped so a rare attribute cannot explode."""
    r = torch.tensor(rates, dtype=torch.float32).clamp(1e-3, 1 - 1e-3)
    return ((1 - r) / r).clamp(max=100.0)
