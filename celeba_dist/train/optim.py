"""Optimizer and learning-rate schedule registries. Schedules are stepped once per optimizer step."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch.optim import lr_scheduler

if TYPE_CHECKING:  # the builders only read these sections' fields: no import of config at run time
    from celeba_dist.config import OptimConfig, SchedConfig

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay),
    "adamax": lambda params, c: torch.optim.Adamax(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay),
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                             weight_decay=c.weight_decay),
}


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Only parameters that need a gradient reach the optimizer: frozen layers are left out."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.name!r}; valid: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[cfg.name](trainable, cfg)


def _warmup(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _constant(opt, c: SchedConfig, o: OptimConfig, steps_per_epoch: int, total: int):
    return lr_scheduler.LambdaLR(opt, lambda s: _warmup(s, c.warmup_steps))


def _step(opt, c: SchedConfig, o: OptimConfig, steps_per_epoch: int, total: int):
    every = max(1, c.step_size_epochs * steps_per_epoch)
    return lr_scheduler.LambdaLR(opt, lambda s: _warmup(s, c.warmup_steps) * c.gamma ** (s // every))


def _cosine(opt, c: SchedConfig, o: OptimConfig, steps_per_epoch: int, total: int):
    floor = c.min_lr / o.lr if o.lr else 0.0

    def factor(s: int) -> float:
        if s < c.warmup_steps:
            return _warmup(s, c.warmup_steps)
        progress = min(1.0, (s - c.warmup_steps) / max(1, total - c.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return lr_scheduler.LambdaLR(opt, factor)


def _onecycle(opt, c: SchedConfig, o: OptimConfig, steps_per_epoch: int, total: int):
    return lr_scheduler.OneCycleLR(opt, max_lr=o.lr, total_steps=max(2, total), pct_start=c.pct_start)


def _cyclic(opt, c: SchedConfig, o: OptimConfig, steps_per_epoch: int, total: int):
    half = max(1, round(c.cycle_epochs * steps_per_epoch / 2))
    momentum = o.name == "sgd" and o.momentum > 0
    return lr_scheduler.CyclicLR(opt, base_lr=c.base_lr, max_lr=o.lr, step_size_up=half, mode=c.cyclic_mode,
                                 cycle_momentum=momentum, base_momentum=0.8 * o.momentum, max_momentum=o.momentum)


SCHEDULERS: dict[str, Callable[..., lr_scheduler.LRScheduler]] = {
    "constant": _constant,
    "step": _step,
    "cosine": _cosine,
    "onecycle": _onecycle,
    "cyclic": _cyclic,
}


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedConfig, optim_cfg: OptimConfig, *,
                    steps_per_epoch: int, total_steps: int) -> lr_scheduler.LRScheduler:
    if cfg.name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {cfg.name!r}; valid: {sorted(SCHEDULERS)}")
    return SCHEDULERS[cfg.name](optimizer, cfg, optim_cfg, steps_per_epoch, total_steps)
