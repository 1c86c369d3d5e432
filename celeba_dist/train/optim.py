"""Optimizer and learning-rate schedule registries. Schedules are stepped once per optimizer step.

The builders take keyword arguments (a config section unpacked by ``train.main``), not config objects.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable, Iterable

import torch
from torch.optim import lr_scheduler

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay),
    "adamax": lambda params, c: torch.optim.Adamax(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay),
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                             weight_decay=c.weight_decay),
}


def build_optimizer(params: Iterable[torch.nn.Parameter], *, name: str, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9, nesterov: bool = False,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Only parameters that need a gradient reach the optimizer: frozen layers are left out.
    ``momentum``/``nesterov`` are SGD's, ``betas`` the Adam family's."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {sorted(OPTIMIZERS)}")
    c = SimpleNamespace(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, betas=tuple(betas))
    return OPTIMIZERS[name](trainable, c)


def _warmup(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _peak_lr(opt: torch.optim.Optimizer) -> float:
    return opt.defaults["lr"]


def _constant(opt, c, steps_per_epoch: int, total: int):
    return lr_scheduler.LambdaLR(opt, lambda s: _warmup(s, c.warmup_steps))


def _step(opt, c, steps_per_epoch: int, total: int):
    every = max(1, c.step_size_epochs * steps_per_epoch)
    return lr_scheduler.LambdaLR(opt, lambda s: _warmup(s, c.warmup_steps) * c.gamma ** (s // every))


def _cosine(opt, c, steps_per_epoch: int, total: int):
    floor = c.min_lr / _peak_lr(opt) if _peak_lr(opt) else 0.0

    def factor(s: int) -> float:
        if s < c.warmup_steps:
            return _warmup(s, c.warmup_steps)
        progress = min(1.0, (s - c.warmup_steps) / max(1, total - c.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return lr_scheduler.LambdaLR(opt, factor)


def _onecycle(opt, c, steps_per_epoch: int, total: int):
    return lr_scheduler.OneCycleLR(opt, max_lr=_peak_lr(opt), total_steps=max(2, total), pct_start=c.pct_start)


def _cyclic(opt, c, steps_per_epoch: int, total: int):
    half = max(1, round(c.cycle_epochs * steps_per_epoch / 2))
    momentum = opt.defaults.get("momentum", 0.0) if isinstance(opt, torch.optim.SGD) else 0.0
    return lr_scheduler.CyclicLR(opt, base_lr=c.base_lr, max_lr=_peak_lr(opt), step_size_up=half, mode=c.cyclic_mode,
                                 cycle_momentum=momentum > 0, base_momentum=0.8 * momentum, max_momentum=momentum)


SCHEDULERS: dict[str, Callable[..., lr_scheduler.LRScheduler]] = {
    "constant": _constant,
    "step": _step,
    "cosine": _cosine,
    "onecycle": _onecycle,
    "cyclic": _cyclic,
}


def build_scheduler(optimizer: torch.optim.Optimizer, *, name: str, steps_per_epoch: int, total_steps: int,
                    warmup_steps: int = 0, step_size_epochs: int = 10, gamma: float = 0.1, min_lr: float = 0.0,
                    base_lr: float = 1e-4, cycle_epochs: float = 2.0, cyclic_mode: str = "triangular",
                    pct_start: float = 0.3) -> lr_scheduler.LRScheduler:
    """Schedule ``name`` around the optimizer's learning rate (the peak; ``base_lr`` is cyclic's floor)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {sorted(SCHEDULERS)}")
    c = SimpleNamespace(warmup_steps=warmup_steps, step_size_epochs=step_size_epochs, gamma=gamma, min_lr=min_lr,
                        base_lr=base_lr, cycle_epochs=cycle_epochs, cyclic_mode=cyclic_mode, pct_start=pct_start)
    return SCHEDULERS[name](optimizer, c, steps_per_epoch, total_steps)
