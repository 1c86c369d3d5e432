"""What the TensorBoard prediction grid says about each image."""
from __future__ import annotations

import torch

from celeba_dist.train.board import grid_lines, prediction_grid

ATTRS = ["Bald", "Bangs", "Eyeglasses", "Male", "Smiling", "Wearing_Hat"]


def test_grid_names_the_mistakes_first_then_the_confident_positives():
    probs = [0.01, 0.20, 0.97, 0.10, 0.80, 0.60]
    truth = [0, 1, 0, 1, 1, 1]  # Bangs and Male missed, Eyeglasses a false positive
    lines = grid_lines(probs, truth, ATTRS, max_lines=4)
    # the most confidently wrong first: Eyeglasses (0.97 for a 0), Male (0.10 for a 1), Bangs (0.20 for a 1)
    assert [text.split()[1] for text, _ in lines] == ["Eyeglasses", "Male", "Bangs", "Smiling"]
    assert [ok for _, ok in lines] == [False, False, False, True]
    assert lines[0][0] == "x Eyeglasses 0.97 (t=0)" and lines[3][0] == "+ Smiling 0.80 (t=1)"
    # Bald, a confident correct negative, is never the news; alphabetical order plays no part
    assert all("Bald" not in text for text, _ in grid_lines(probs, truth, ATTRS, max_lines=6))
    # the run's thresholds decide what is wrong: with these, every attribute is right
    tuned = grid_lines(probs, truth, ATTRS, thresholds=[0.5, 0.1, 0.99, 0.05, 0.5, 0.5], max_lines=3)
    assert tuned == [("+ Smiling 0.80 (t=1)", True), ("+ Wearing_Hat 0.60 (t=1)", True), ("+ Bangs 0.20 (t=1)", True)]


def test_grid_frames_an_image_red_when_any_attribute_is_wrong():
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.9]])
    truth = torch.tensor([[1, 0], [1, 0]])  # the second image's second attribute is wrong
    grid = prediction_grid(images, probs, truth, ["Smiling", "Male"], max_lines=1)
    tile_w = grid.shape[1] // 2
    assert tuple(grid[2, 2]) == (0, 180, 0) and tuple(grid[2, tile_w + 4]) == (220, 0, 0)


def test_a_score_exactly_at_its_tuned_threshold_is_a_positive_on_the_grid():
    """Tuned thresholds are scores of validation samples, so a score equal to its threshold is common; it is a
    positive prediction (as ``decide`` and the metrics say, p >= t) and shows as one, not as nothing."""
    lines = grid_lines([0.30, 0.10], [1, 0], ["Smiling", "Male"], thresholds=[0.30, 0.5], max_lines=2)
    assert lines == [("+ Smiling 0.30 (t=1)", True)]
