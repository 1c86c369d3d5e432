"""Metrics against brute-force definitions."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from celeba_dist.train.metrics import auroc, compute_metrics, tuned_thresholds


def brute_auroc(scores, labels):
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_definition_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(200, 3, generator=g) * 10).round() / 10  # many ties
    labels = (torch.rand(200, 3, generator=g) < 0.3).float()
    got = auroc(scores, labels)
    for a in range(3):
        assert math.isclose(float(got[a]), brute_auroc(scores[:, a].tolist(), labels[:, a].tolist()), abs_tol=1e-12)


def test_counts_and_means():
    probs = torch.tensor([[0.9, 0.2], [0.4, 0.6], [0.7, 0.1], [0.2, 0.8]])
    targets = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 0]]).float()
    m = compute_metrics(probs, targets, ["A", "B"])
    a = m["attributes"]["A"]
    assert (a["tp"], a["fp"], a["tn"], a["fn"]) == (1, 1, 1, 1)
    assert a["accuracy"] == 0.5 and a["balanced_accuracy"] == 0.5 and a["f1"] == 0.5
    b = m["attributes"]["B"]
    assert (b["tp"], b["fp"], b["tn"], b["fn"]) == (1, 1, 2, 0)
    assert b["accuracy"] == 0.75
    assert math.isclose(b["balanced_accuracy"], 0.5 * (1.0 + 2 / 3))
    assert math.isclose(b["f1"], 2 / 3)
    assert m["mean"]["num_samples"] == 4
    assert math.isclose(m["mean"]["accuracy"], 0.625)


def test_single_class_attribute_has_no_auroc():
    m = compute_metrics(torch.tensor([[0.2], [0.7]]), torch.tensor([[0.0], [0.0]]), ["A"])
    assert m["attributes"]["A"]["auroc"] is None
    assert m["attributes"]["A"]["balanced_accuracy"] == 0.5  # only the TNR is defined


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy"])
def test_tuned_thresholds_maximise_their_metric(metric):
    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(500, 1, generator=g) < 0.1).float()
    scores = (labels * 0.3 + torch.rand(500, 1, generator=g) * 0.5)  # positives higher, all below 0.8
    thr = tuned_thresholds(scores, labels, metric)
    tuned = compute_metrics(scores, labels, ["A"], thr)["attributes"]["A"][metric]
    for t in torch.linspace(0, 1, 101):
        other = compute_metrics(scores, labels, ["A"], t)["attributes"]["A"][metric]
        assert tuned >= other - 1e-12
    other_metric = {"accuracy": "balanced_accuracy", "balanced_accuracy": "accuracy"}[metric]
    rival = compute_metrics(scores, labels, ["A"], tuned_thresholds(scores, labels, other_metric))["attributes"]["A"]
    assert rival[metric] < tuned  # on a rare attribute the two metrics want different thresholds


def test_accuracy_thresholds_may_predict_no_positive():
    # 1 positive in 10, scored below four negatives: any cut that catches it costs more than it gains
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.5], [0.1], [0.1], [0.1], [0.1], [0.1]])
    labels = torch.tensor([[0.0]] * 4 + [[1.0]] + [[0.0]] * 5)
    thr = tuned_thresholds(scores, labels, "accuracy")
    assert float(thr[0]) > 0.9
    assert compute_metrics(scores, labels, ["A"], thr)["attributes"]["A"]["accuracy"] == 0.9
    with pytest.raises(ValueError, match="f1"):
        tuned_thresholds(scores, labels, "f1")


def test_means_leave_out_attributes_whose_metric_is_undefined():
    # B never occurs: its AUROC is undefined, and the mean AUROC is A's alone, not undefined as well
    probs = torch.tensor([[0.9, 0.2], [0.4, 0.6], [0.7, 0.1], [0.2, 0.8]])
    targets = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 0]]).float()
    m = compute_metrics(probs, targets, ["A", "B"])
    assert m["attributes"]["B"]["auroc"] is None
    assert m["attributes"]["A"]["auroc"] == brute_auroc(probs[:, 0].tolist(), targets[:, 0].tolist()) == 0.75
    assert m["mean"]["auroc"] == 0.75
    assert m["mean"]["balanced_accuracy"] == pytest.approx((0.5 + 0.5) / 2)  # B's TNR alone: 2/4 predicted negative


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy"])
def test_tuned_thresholds_on_tied_scores_beat_every_cut(metric):
    """Scores with many ties (as a saturated or quantised model gives): the tuned threshold's metric, computed
    by compute_metrics at that threshold, is the best of every possible cut (each distinct score, and above all)."""
    g = torch.Generator().manual_seed(3)
    labels = (torch.rand(300, 1, generator=g) < 0.3).float()
    scores = ((labels * 0.25 + torch.rand(300, 1, generator=g) * 0.75) * 8).round() / 8  # 9 distinct values
    thr = tuned_thresholds(scores, labels, metric)
    tuned = compute_metrics(scores, labels, ["A"], thr)["attributes"]["A"][metric]
    cuts = [*scores.unique().tolist(), float(scores.max()) + 1]
    best = max(compute_metrics(scores, labels, ["A"], t)["attributes"]["A"][metric] for t in cuts)
    assert tuned == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy"])
def test_an_attribute_with_one_class_keeps_threshold_one_half(metric):
    # B has no positive in these (validation) scores: nothing to tune on, so it keeps 0.5 (not NaN, not "never")
    scores = torch.tensor([[0.9, 0.7], [0.8, 0.6], [0.3, 0.2], [0.1, 0.4]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    thr = tuned_thresholds(scores, labels, metric)
    assert float(thr[1]) == 0.5 and math.isfinite(float(thr[0]))


def test_attribute_csv_columns_hold_their_counts(tmp_path):
    import csv

    from celeba_dist.train.metrics import write_attribute_csv

    probs = torch.tensor([[0.9, 0.2], [0.4, 0.6], [0.7, 0.1], [0.2, 0.8], [0.6, 0.3]])
    targets = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 0], [1, 0]]).float()
    block = compute_metrics(probs, targets, ["A", "B"])
    write_attribute_csv({"test": block}, tmp_path / "m.csv")
    with open(tmp_path / "m.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["split"], r["attribute"]) for r in rows] == [("test", "A"), ("test", "B")]
    a = rows[0]
    assert (int(a["tp"]), int(a["fp"]), int(a["tn"]), int(a["fn"])) == (2, 1, 1, 1)
    assert float(a["accuracy"]) == pytest.approx(0.6) and float(a["f1"]) == pytest.approx(2 / 3)
    b = rows[1]
    assert (int(b["tp"]), int(b["fp"]), int(b["tn"]), int(b["fn"])) == (1, 1, 3, 0)
