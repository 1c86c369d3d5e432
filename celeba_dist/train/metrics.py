"""Exact per-attribute metrics from all of a split's scores (gathered across ranks beforehand).

Accuracy, balanced accuracy (mean of the true-positive and true-negative rates), F1 and AUROC
(the Mann-Whitney statistic, ties counted half) per attribute, and their means. Counts are
integers computed from every sample once; nothing is estimated from batches.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from celeba_dist.diskio import atomic_write

METRICS = ("accuracy", "balanced_accuracy", "f1", "auroc")


@dataclass(frozen=True)
class Confusion:
    tp: torch.Tensor  # (A,) int64
    fp: torch.Tensor
    tn: torch.Tensor
    fn: torch.Tensor


def confusion(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor | float = 0.5) -> Confusion:
    """probs, targets: (N, A); a sample is positive when its score >= the attribute's threshold."""
    pred = probs >= torch.as_tensor(thresholds, dtype=probs.dtype)
    true = targets > 0.5
    return Confusion(
        tp=(pred & true).sum(0), fp=(pred & ~true).sum(0), tn=(~pred & ~true).sum(0), fn=(~pred & true).sum(0)
    )


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num.double() / den.clamp(min=1).double(), torch.full_like(num, math.nan, dtype=torch.float64))


def auroc(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Exact AUROC per column of (N, A) scores; NaN where a column has a single class."""
    out = torch.empty(scores.shape[1], dtype=torch.float64)
    for a in range(scores.shape[1]):
        s, t = scores[:, a].double(), targets[:, a] > 0.5
        pos, neg = int(t.sum()), int((~t).sum())
        if pos == 0 or neg == 0:
            out[a] = math.nan
            continue
        order = torch.argsort(s)
        sorted_s = s[order]
        ranks = torch.empty_like(sorted_s)
        # average ranks over ties (1-based)
        unique, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
        ends = torch.cumsum(counts, 0).double()
        avg = ends - (counts.double() - 1) / 2
        ranks[order] = avg[inverse]
        out[a] = (ranks[t].sum() - pos * (pos + 1) / 2) / (pos * neg)
    return out


def compute_metrics(probs: torch.Tensor, targets: torch.Tensor, attributes: list[str],
                    thresholds: torch.Tensor | float = 0.5) -> dict:
    """The metrics.json block of one split: ``mean`` and per-attribute ``attributes``, plus counts."""
    if probs.shape != targets.shape or probs.shape[1] != len(attributes):
        raise ValueError(f"shape mismatch: probs {tuple(probs.shape)}, targets {tuple(targets.shape)}, "
                         f"{len(attributes)} attributes")
    c = confusion(probs, targets, thresholds)
    n = probs.shape[0]
    tpr, tnr = _ratio(c.tp, c.tp + c.fn), _ratio(c.tn, c.tn + c.fp)
    per = {
        "accuracy": ((c.tp + c.tn).double() / max(n, 1)),
        "balanced_accuracy": torch.stack([tpr, tnr]).nanmean(0),
        "f1": torch.where(2 * c.tp + c.fp + c.fn > 0, _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn),
                          torch.zeros_like(tpr)),
        "auroc": auroc(probs, targets),
    }
    attrs = {
        name: {**{m: _num(per[m][i]) for m in METRICS},
               **{k: int(getattr(c, k)[i]) for k in ("tp", "fp", "tn", "fn")}}
        for i, name in enumerate(attributes)
    }
    mean = {m: _num(per[m].nanmean()) for m in METRICS}
    mean["num_samples"] = n
    return {"mean": mean, "attributes": attrs}


def _num(x: torch.Tensor) -> float | None:
    value = float(x)
    return None if math.isnan(value) else value


def tuned_thresholds(probs: torch.Tensor, targets: torch.Tensor, metric: str) -> torch.Tensor:
    """Per attribute, the score threshold that maximises ``metric`` (``accuracy`` or ``balanced_accuracy``)
    on these scores (validation's): every cut between two distinct scores is tried, and for accuracy also
    "no positive" (a threshold above every score), which can be the most accurate on a rare attribute.
    An attribute with a single class keeps 0.5; ties go to the cut nearest 0.5's side (the first found)."""
    if metric not in ("accuracy", "balanced_accuracy"):
        raise ValueError(f"unknown threshold metric {metric!r}; valid: ['accuracy', 'balanced_accuracy']")
    out = torch.full((probs.shape[1],), 0.5, dtype=probs.dtype)
    for a in range(probs.shape[1]):
        s, t = probs[:, a], targets[:, a] > 0.5
        pos, neg = int(t.sum()), int((~t).sum())
        if pos == 0 or neg == 0:
            continue
        order = torch.argsort(s, descending=True)
        s_sorted, t_sorted = s[order], t[order]
        tp = torch.cumsum(t_sorted, 0).double()  # predicted positive: the first k+1 scores
        fp = torch.cumsum(~t_sorted, 0).double()
        if metric == "accuracy":
            score = (tp + (neg - fp)) / (pos + neg)
        else:
            score = 0.5 * (tp / pos + (neg - fp) / neg)
        # only cut where the score changes, so the threshold separates exactly these samples
        last_of_run = torch.ones_like(t_sorted)
        last_of_run[:-1] = s_sorted[:-1] != s_sorted[1:]
        score[~last_of_run] = -1
        k = int(torch.argmax(score))
        none_positive = neg / (pos + neg) if metric == "accuracy" else 0.5
        if none_positive > float(score[k]):
            out[a] = torch.nextafter(s_sorted[0], torch.tensor(math.inf, dtype=s.dtype))
        else:
            out[a] = s_sorted[k]
    return out


def format_table(metrics: dict, title: str = "") -> str:
    """A fixed-width per-attribute table with the mean as the last row."""
    head = f"{'attribute':<22}" + "".join(f"{m:>19}" for m in METRICS)
    rows = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for name, vals in metrics["attributes"].items():
        rows.append(f"{name:<22}" + "".join(_cell(vals[m]) for m in METRICS))
    rows.append("-" * len(head))
    rows.append(f"{'mean':<22}" + "".join(_cell(metrics['mean'][m]) for m in METRICS))
    return "\n".join(rows)


def _cell(value: float | None) -> str:
    return f"{'n/a':>19}" if value is None else f"{value:>19.4f}"


def write_attribute_csv(results: dict[str, dict], path: Path) -> None:
    """One row per (split, attribute) with the four metrics and the confusion counts."""
    with atomic_write(path, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "attribute", *METRICS, "tp", "fp", "tn", "fn"])
        for split, block in results.items():
            for name, vals in block["attributes"].items():
                writer.writerow([split, name, *[vals[m] for m in METRICS], vals["tp"], vals["fp"], vals["tn"], vals["fn"]])
