"""An exponential moving average of the weights (``train.ema_decay``), on torch's own ``AveragedModel``.

After every optimizer step ``ema = decay * ema + (1 - decay) * w`` for every parameter and buffer (the
first update copies ``w``), on each rank: DDP keeps the weights identical on every rank, so the averages
are too. The average lives beside the trained model, is validated beside it at every epoch end, and is
saved in every checkpoint (``"ema"``: the network's state dict, ``"ema_updates"``), so a resumed run
continues the same average. Which of the two a checkpoint's evaluation uses is its ``"weights"``
(:func:`selected_weights`).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

log = logging.getLogger(__name__)

RAW, EMA = "raw", "ema"


class WeightEMA:
    """The average of one model's weights; ``module`` is a network like the trained one, for evaluation."""

    def __init__(self, model: torch.nn.Module, *, decay: float):
        self.decay = decay
        # buffers too (BatchNorm's running statistics), as torchvision's references do
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.eval()

    @property
    def module(self) -> torch.nn.Module:
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.module.state_dict(), "ema_updates": self.updates}

    def load_state_dict(self, ckpt: dict[str, Any]) -> bool:
        """Continue the average a checkpoint holds; False (and a fresh average) when it holds none."""
        if ckpt.get("ema") is None:
            log.warning("the checkpoint holds no EMA of the weights (saved without train.ema_decay): the average "
                        "starts again from the resumed weights")
            return False
        self.module.load_state_dict(ckpt["ema"])
        self.averaged.n_averaged.fill_(int(ckpt.get("ema_updates", 1)))
        return True


def build_ema(model: torch.nn.Module, decay: float | None) -> WeightEMA | None:
    return None if decay is None else WeightEMA(model, decay=decay)


def selected_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network weights a checkpoint's evaluation uses: the EMA where validation chose it, else the raw ones."""
    if ckpt.get("weights") == EMA:
        if ckpt.get("ema") is None:
            raise RuntimeError("the checkpoint selects its EMA weights but holds none")
        return ckpt["ema"]
    return ckpt["model"]
