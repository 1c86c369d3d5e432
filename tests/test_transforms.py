"""crop178_resize, the smiling CNN's input: a random 178 square for training, the central one for evaluation.

Row and column indices painted into lossless PNGs make the crop's offset readable from the output; real
packed shards (full-size and ``--resize 64x78``) go through the loader's own decoder and per-sample seeds.
"""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from celeba_dist.data.streams import ShardData, deal_shards, make_loader, read_part, sample_seed, train_stream
from celeba_dist.data.transforms import augment_batch, build_cached_form, build_transform, decode_rgb, to_tensor
from shardkit import synthetic_shards


def index_png(width: int, height: int) -> bytes:
    """An RGB PNG whose red channel is the row index and green the column index of each pixel."""
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack([rows, cols, np.full_like(rows, 128)], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def crop_origin(image: torch.Tensor) -> tuple[int, int, bool]:
    """(top, left, flipped) of an unresampled crop of :func:`index_png`, read from its corner pixels."""
    top, first, last = int(image[0, 0, 0]), int(image[1, 0, 0]), int(image[1, 0, -1])
    return top, min(first, last), first > last


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The same 60 synthetic images packed full-size (178x218) and with --resize 64x78."""
    root = tmp_path_factory.mktemp("transforms")
    return (synthetic_shards(root, num_images=60, samples_per_shard=16),
            synthetic_shards(root, num_images=60, samples_per_shard=16, extra=("--resize", "64x78")))


def split_samples(shards, split: str) -> dict[str, dict]:
    data = ShardData(str(shards), "all")
    return {s["__key__"]: s for part in deal_shards(data.split(split).shards, 1, 0) for s in read_part(part)}


@pytest.mark.parametrize("size, image_size, slack", [((178, 218), (178, 178), 40), ((64, 78), (64, 64), 14)])
def test_training_crop_covers_every_valid_top(size, image_size, slack):
    """Full-size CelebA: a top in 0..40; pre-resized 64x78: a top in 0..14. Uniform over those, never outside."""
    png, train = index_png(*size), build_transform("crop178_resize", image_size=image_size, train=True)
    tops, flips = [], 0
    for seed in range(40 * (slack + 1)):
        image = train(png, random.Random(seed))
        assert image.shape == (3, *image_size)
        top, left, flipped = crop_origin(image)
        assert left == 0 and int(image[0, -1, 0]) == top + image_size[0] - 1  # a whole, unresampled square
        tops.append(top)
        flips += flipped
    counts = np.bincount(tops, minlength=slack + 1)
    assert len(counts) == slack + 1 and counts.min() > 0, counts  # both ends and all between, nothing beyond
    assert counts.max() < 3 * counts.min(), counts
    assert 0.4 < flips / len(tops) < 0.6


def test_training_crop_of_a_landscape_image_moves_along_its_width():
    png, train = index_png(218, 178), build_transform("crop178_resize", image_size=(178, 178), train=True)
    origins = {crop_origin(train(png, random.Random(seed)))[:2] for seed in range(300)}
    assert {top for top, _ in origins} == {0} and {left for _, left in origins} == set(range(41))


def test_evaluation_crop_is_central_whatever_the_rng():
    for size, image_size, top in (((178, 218), (178, 178), 20), ((64, 78), (64, 64), 7)):
        png, evaluate = index_png(*size), build_transform("crop178_resize", image_size=image_size, train=False)
        first = evaluate(png, random.Random(0))
        assert crop_origin(first) == (top, 0, False)
        assert all(torch.equal(evaluate(png, random.Random(seed)), first) for seed in range(1, 50))
        assert torch.equal(evaluate(png, None), first)


def test_training_tensors_are_drawn_per_epoch_and_reproducible(packed):
    """Through the loader's decoder and its per-sample seed (seed, epoch, sample id): another epoch gives
    another crop, not only another flip; the same (seed, epoch) gives the same tensor; evaluation never varies."""
    full, _ = packed
    data = ShardData(str(full), "all")
    train = data.decoder(build_transform("crop178_resize", image_size=(64, 64), train=True))
    evaluate = data.decoder(build_transform("crop178_resize", image_size=(64, 64), train=False))
    for key, sample in list(split_samples(full, "train").items())[:4]:
        per_epoch = [train(sample, sample_seed(3, epoch, key))[0] for epoch in range(8)]
        again = [train(sample, sample_seed(3, epoch, key))[0] for epoch in range(8)]
        assert all(torch.equal(a, b) for a, b in zip(per_epoch, again))
        moved = [x for x in per_epoch[1:] if not (torch.equal(x, per_epoch[0]) or torch.equal(x, per_epoch[0].flip(-1)))]
        assert len(moved) >= 4, key
        shown = [evaluate(sample, sample_seed(3, epoch, key))[0] for epoch in range(8)]
        assert all(torch.equal(x, shown[0]) for x in shown)


def test_the_loader_draws_the_crop_again_every_epoch(packed):
    full, _ = packed
    data = ShardData(str(full), "all")
    stream = train_stream(data, build_transform("crop178_resize", image_size=(32, 32), train=True), batch_size=4,
                          rank=0, world_size=1, num_workers=0, seed=1, shuffle_buffer=8)

    def by_key(epoch: int) -> dict[str, torch.Tensor]:
        stream.epoch = epoch
        return {k: img for batch in make_loader(stream, num_workers=0) for k, img in zip(batch.keys, batch.images)}

    first, replay, later = by_key(0), by_key(0), by_key(1)
    assert first.keys() == replay.keys() and all(torch.equal(first[k], replay[k]) for k in first)
    common = first.keys() & later.keys()
    moved = [k for k in common if not (torch.equal(first[k], later[k]) or torch.equal(first[k], later[k].flip(-1)))]
    assert len(moved) > len(common) // 2


def test_pre_resized_shards_evaluate_like_full_size_ones(packed):
    """--resize 64x78 shards: evaluation is their decoded image's central 64x64 window, with no resize, and
    it shows what the full-size shards' evaluation shows (the same window of the face; the pixels differ
    by the packer's bicubic resize and JPEG re-encoding against the loader's 3/8-scale decode and bilinear
    resize, a few levels of 255 on average)."""
    full, small = packed
    evaluate = build_transform("crop178_resize", image_size=(64, 64), train=False)
    big, little = split_samples(full, "test"), split_samples(small, "test")
    assert big.keys() == little.keys() and big
    for key in big:
        reference = evaluate(big[key]["jpg"], None).float()
        decoded = to_tensor(decode_rgb(little[key]["jpg"]))
        assert decoded.shape == (3, 78, 64)
        got = evaluate(little[key]["jpg"], None)
        assert torch.equal(got, decoded[:, 7:71, :])
        windows = [(decoded[:, top:top + 64, :].float() - reference).abs().mean().item() for top in range(15)]
        assert windows.index(min(windows)) == 7 and windows[7] < 8, (key, windows)


def test_cached_form_caches_the_aspect_kept_resize_and_crops_per_batch():
    """data.cache: a 64-wide, 78-high image is cached for any input, and each batch takes a 64x64 window
    of it at a top drawn per sample in 0..14 (both ends reached), flipped half the time."""
    form = build_cached_form("crop178_resize", image_size=(64, 64), train=True)
    assert form.size == (78, 64) and form.crop == (64, 64) and form.flip
    for size in ((178, 218), (64, 78), (200, 200), (300, 160)):
        assert form.base(index_png(*size), None).shape == (3, 78, 64), size
    small = index_png(64, 78)
    assert torch.equal(form.base(small, None), to_tensor(decode_rgb(small)))  # pre-resized: cached as decoded

    base = form.base(index_png(178, 218), None)  # rows resized from 218 to 78: distinct red values per row
    seeds = torch.arange(400, dtype=torch.int64) * 7919
    batch = augment_batch(base.expand(len(seeds), -1, -1, -1), seeds, form)
    assert batch.shape == (400, 3, 64, 64) and batch.dtype == torch.uint8
    windows = base.unfold(1, 64, 1)  # (3, 15, 64, 64): every 64-row window, as (C, top, W, H)
    tops, flips = [], 0
    for image in batch:
        match = [top for top in range(15) for candidate in (image, image.flip(-1))
                 if torch.equal(windows[:, top].transpose(1, 2), candidate)]
        assert len(match) == 1
        tops.append(match[0])
        flips += not torch.equal(windows[:, match[0]].transpose(1, 2), image)
    assert set(tops) == set(range(15))
    assert 0.4 < flips / len(tops) < 0.6
    again = augment_batch(base.expand(len(seeds), -1, -1, -1), seeds, form)
    assert torch.equal(batch, again)
