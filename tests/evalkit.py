"""What ``celeba-dist eval`` scores a split with, per sample: its own steps (``engine.evaluate`` over
``train.eval_loader``), on a checkpoint with the checkpoint's config.

Accelerate fixes the mixed precision once per process, so a checkpoint trained in bf16 is scored in a
process of its own: ``python tests/evalkit.py CHECKPOINT OUT.json SPLIT...`` writes
``{split: {"keys", "probs", "targets"}}``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from celeba_dist.config import config_from_tree
from celeba_dist.data.streams import ShardData
from celeba_dist.train.build import build_model_for, eval_loader
from celeba_dist.train.ema import selected_weights
from celeba_dist.train.checkpoint import load_checkpoint
from celeba_dist.train.distributed import build_accelerator
from celeba_dist.train.engine import Predictions, evaluate
from celeba_dist.train.losses import LOSSES


def eval_predictions(checkpoint: Path, split: str) -> Predictions:
    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_tree(ckpt["config"], ["model.pretrained=none", "run.resume=none"])
    accelerator = build_accelerator(precision=cfg.train.precision,
                                    collective_timeout_min=cfg.train.collective_timeout_min)
    data = ShardData(cfg.data.root, ckpt["attributes"])
    model = build_model_for(cfg, len(data.attributes))
    model.load_state_dict(selected_weights(ckpt))  # the EMA where validation chose it
    return evaluate(model, eval_loader(cfg, data, split, accelerator), accelerator=accelerator, cfg=cfg,
                    to_prob=LOSSES[cfg.loss.name].to_prob, expected=data.split(split).num_samples, split=split,
                    num_attributes=len(data.attributes))


def eval_probabilities(checkpoint: Path, split: str) -> dict[str, list[float]]:
    """Per sample id, the probability of each attribute."""
    preds = eval_predictions(checkpoint, split)
    return dict(zip(preds.keys, preds.probs.tolist()))


if __name__ == "__main__":
    path, out, *splits = sys.argv[1:]
    result = {}
    for name in splits:
        preds = eval_predictions(Path(path), name)
        result[name] = {"keys": preds.keys, "probs": preds.probs.tolist(), "targets": preds.targets.tolist()}
    Path(out).write_text(json.dumps(result))
