"""Every shipped recipe builds its model, loss, optimizer and schedule and takes one training step."""
from __future__ import annotations

import dataclasses
import math
import pytest
import torch

from celeba_dist.attributes import resolve_attributes
from celeba_dist.config import load_config, shipped_recipes
from celeba_dist.data.transforms import normalize_batch
from celeba_dist.models import build_model, trainable_parameters
from celeba_dist.train.losses import LOSSES, build_loss, positive_weights
from celeba_dist.train.optim import build_optimizer, build_scheduler


@pytest.mark.parametrize("name", shipped_recipes())
def test_recipe_takes_a_training_step(name):
    # ImageNet weights cannot be downloaded here; their loading is tested in test_models.py.
    cfg = load_config(name, ["model.pretrained=none"])
    attributes = resolve_attributes(cfg.data.attributes)
    model = build_model(cfg.model.name, num_attributes=len(attributes), pretrained="none", **cfg.model.options)
    optimizer = build_optimizer(model.parameters(), **dataclasses.asdict(cfg.optim))
    scheduler = build_scheduler(optimizer, **dataclasses.asdict(cfg.sched), steps_per_epoch=10, total_steps=100)
    pos_weight = positive_weights([0.3] * len(attributes)) if cfg.loss.pos_weight else None
    loss_fn = build_loss(cfg.loss.name, pos_weight=pos_weight)
    h, w = cfg.data.image_size
    images = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8)
    targets = torch.tensor([[1.0] * len(attributes), [0.0] * len(attributes)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    out = model(normalize_batch(images, cfg.data.normalize))
    assert out.shape == (2, len(attributes))
    loss = loss_fn(out, targets)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # The step moved every parameter with a real gradient (Adam's eps is 1e-8: far smaller ones may move by
    # less than float32 resolves at the first warm-up step's lr) and none of the frozen ones.
    assert {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 1e-4} <= changed
    assert changed and all(p.requires_grad for n, p in model.named_parameters() if n in changed)
    probs = LOSSES[cfg.loss.name].to_prob(out.detach())
    assert ((probs >= 0) & (probs <= 1)).all()
    assert sum(p.numel() for p in trainable_parameters(model)) == sum(
        p.numel() for g in optimizer.param_groups for p in g["params"])


def test_resnext_recipe_freezes_six_children():
    cfg = load_config("attrs40_resnext50", ["model.pretrained=none"])
    model = build_model(cfg.model.name, num_attributes=40, **cfg.model.options)
    children = list(model.children()) if not hasattr(model, "backbone") else list(model.backbone.children())
    frozen = [all(not p.requires_grad for p in c.parameters()) for c in children[:6]]
    assert all(frozen) and any(p.requires_grad for c in children[6:] for p in c.parameters())


def test_positive_weights_are_the_negative_to_positive_ratio_clipped():
    """loss.pos_weight: a rare attribute's positives weigh more (neg/pos), a common one's less; a rate of 0 is
    clipped instead of dividing by zero."""
    weights = positive_weights([0.2, 0.5, 0.8, 0.0])
    torch.testing.assert_close(weights, torch.tensor([4.0, 1.0, 0.25, 100.0]))
    loss = build_loss("bce", pos_weight=weights[:1])
    # one positive sample at logit 0: BCE's -log(sigmoid(0)) = log 2, weighted by the attribute's 4
    assert float(loss(torch.zeros(1, 1), torch.ones(1, 1))) == pytest.approx(4 * math.log(2))


def test_mse_pm1_regresses_plus_minus_one_and_decides_at_output_zero():
    """The ResNeXt recipe's loss: MSE against the 0/1 labels mapped to -1/+1, and scores that put the decision
    at output 0 (score 0.5), -1 at 0 and +1 at 1, clamped beyond."""
    spec = LOSSES["mse_pm1"]
    outputs = torch.tensor([[1.0, -1.0, 0.5], [-0.5, 0.25, 3.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    by_hand = sum((o - (2 * t - 1)) ** 2 for o, t in zip(outputs.flatten().tolist(), targets.flatten().tolist())) / 6
    assert float(build_loss("mse_pm1")(outputs, targets)) == pytest.approx(by_hand)
    assert float(build_loss("mse_pm1")(torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 0.0]]))) == 0.0
    assert spec.to_prob(torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])).tolist() == [
        0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
