"""data.cache=host|device: the rank's share decoded once, the same batches replayed from memory.

On real shards: the cached loader gives the streaming loader's batches (sample ids, labels, and images
that differ only by the augmentation's draw), a killed cached run resumes to bit-identical weights,
two-process DDP caches one share per rank, and a cache that cannot fit stops before anything trains.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from celeba_dist.data.cache import CachedEval, CachedTrain, cache_bytes, fill_store, fit_problem
from celeba_dist.data.streams import ShardData, deal_shards, make_loader, read_part, train_stream
from celeba_dist.data.transforms import augment_batch, build_cached_form, build_transform
from shardkit import synthetic_shards
from test_resume import assert_killed_run_resumes_exactly, train_cmd
from test_train import cpu_env


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 600 images in 24-sample shards: ~480 training samples, more shards than slots and a short last one
    return synthetic_shards(tmp_path_factory.mktemp("cache"), num_images=600, samples_per_shard=24)


def streamed(data, transform, **kw):
    stream = train_stream(data, transform, **kw)
    return stream, lambda: make_loader(stream, num_workers=kw["num_workers"])


def cached(data, transform_name, image_size, **kw):
    stream = train_stream(data, build_transform(transform_name, image_size=image_size, train=True), **kw)
    form = build_cached_form(transform_name, image_size=image_size, train=True)
    store = fill_store(stream.rank_parts(), data.decoder(form.base), size=form.size, num_attributes=len(data.attributes),
                       device=torch.device("cpu"), pin=False, num_workers=kw["num_workers"], where="test")
    return CachedTrain(stream, store, form, device=torch.device("cpu"))


def epoch_batches(source, epoch: int, skip: int = 0) -> list:
    source.epoch, source.skip_batches = epoch, skip
    return list(source)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1)])
def test_cached_batches_are_the_streamed_ones(shards, world, workers):
    """Same seed: every batch holds the same sample ids and labels as cache=none, in every epoch and after a
    mid-epoch skip; each image is the streamed one or its mirror image (the flip is drawn differently). The
    imagenet preset, whose only random part is the flip: a random crop is drawn differently too (the
    crop's own tests are in test_transforms.py)."""
    data = ShardData(str(shards), ["Smiling", "Male"])
    shares = []
    for rank in range(world):
        kw = dict(batch_size=8, rank=rank, world_size=world, num_workers=workers, seed=5, shuffle_buffer=50)
        stream, loader = streamed(data, build_transform("imagenet", image_size=(32, 32), train=True), **kw)
        cache = cached(data, "imagenet", (32, 32), **kw)
        shares.append(set(cache.store.keys))
        assert len(cache.store.keys) == stream.rank_sizes()[rank]
        flips = 0
        for epoch, skip in ((0, 0), (1, 0), (1, 5)):
            stream.epoch, stream.skip_batches = epoch, skip
            want = list(loader())
            got = epoch_batches(cache, epoch, skip)
            assert len(got) == len(want) == stream.steps_per_epoch - skip
            for a, b in zip(want, got):
                assert a.keys == b.keys
                assert torch.equal(a.labels, b.labels)
                assert b.images.dtype == torch.uint8 and b.images.shape == a.images.shape
                for x, y in zip(a.images, b.images):
                    assert torch.equal(x, y) or torch.equal(x, y.flip(-1))
                    flips += not torch.equal(x, y)
        assert flips > 0  # the draws differ from the streamed ones, but there are draws
        cache.close()
    # each rank caches only its share: disjoint, and together the whole training split
    assert sum(len(s) for s in shares) == len(set().union(*shares)) == data.split("train").num_samples


def test_augmentation_is_a_pure_function_of_seed_epoch_and_sample(shards):
    """The same sample gets the same crop and flip in any batch position and epoch replay; another epoch
    draws again. resize_crop's random crop lies inside the cached 270x220 image."""
    data = ShardData(str(shards), "all")
    kw = dict(batch_size=8, rank=0, world_size=1, num_workers=0, seed=0, shuffle_buffer=20)
    cache = cached(data, "resize_crop", (218, 178), **kw)
    first, again, later = (epoch_batches(cache, e) for e in (0, 0, 1))
    assert all(torch.equal(a.images, b.images) for a, b in zip(first, again))
    by_key = {k: img for batch in first for k, img in zip(batch.keys, batch.images)}
    by_key_later = {k: img for batch in later for k, img in zip(batch.keys, batch.images)}
    common = sorted(set(by_key) & set(by_key_later))
    assert sum(not torch.equal(by_key[k], by_key_later[k]) for k in common) > len(common) // 2
    store = cache.store
    for key in common[:20]:
        base = store.images[store.keys.index(key)]
        img = by_key[key]
        windows = base.unfold(1, 218, 1).unfold(2, 178, 1)  # every 218x178 window of the cached image
        match = [(windows[:, i, j] == im).all() for im in (img, img.flip(-1)) for i in range(windows.shape[1])
                 for j in range(windows.shape[2])]
        assert any(match), key
    # one sample alone in a batch gets the draw it gets among others
    seeds = torch.tensor([7, 8, 9])
    images = store.images[:3]
    assert torch.equal(augment_batch(images, seeds, cache.form)[1], augment_batch(images[1:2], seeds[1:2], cache.form)[0])
    cache.close()


def test_cached_evaluation_matches_the_streamed_images(shards):
    data = ShardData(str(shards), "all")
    form = build_cached_form("crop178_resize", image_size=(32, 32), train=False)
    keys = []
    for rank in range(2):
        parts = deal_shards(data.split("val").shards, 2, rank)
        store = fill_store(parts, data.decoder(form.base), size=form.size, num_attributes=40,
                           device=torch.device("cpu"), pin=False, num_workers=2, where="val")
        for batch in CachedEval(store, batch_size=7, device=torch.device("cpu")):
            for key, img in zip(batch.keys, batch.images):
                sample = next(s for p in parts for s in read_part(p) if s["__key__"] == key)
                assert torch.equal(img, form.base(sample["jpg"], None))
            keys += batch.keys
    assert sorted(keys) == sorted(set(keys)) and len(keys) == data.split("val").num_samples


def test_fit_problem_names_needed_and_free_bytes():
    form = build_cached_form("imagenet", image_size=(20000, 20000), train=True)
    needed = cache_bytes(1000, form, 40)
    problem = fit_problem(needed=needed, local_ranks=2, device=torch.device("cpu"), what="train")
    assert problem and f"({2 * needed} bytes)" in problem and "MemAvailable" in problem
    assert "data.image_size" in problem and "more ranks" in problem
    assert fit_problem(needed=1000, local_ranks=1, device=torch.device("cpu"), what="train") is None


def test_a_cache_that_cannot_fit_stops_before_training(shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "celeba_dist.train", "--config", "smiling_simple_cnn", "--data", str(shards),
           "--run-dir", str(run_dir), "--set", "data.cache=device", "data.transform=imagenet",
           "data.image_size=[20000, 20000]", "log.progress_bar=false"]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert elapsed < 60
    message = proc.stderr.strip().splitlines()[-1]
    needed = re.search(r"needs ([\d.]+) GiB \((\d+) bytes\), more than .* \((\d+) bytes\)", message)
    assert needed, message
    assert int(needed.group(2)) > int(needed.group(3)) > 0
    assert "data.image_size" in message and "data.cache" in message
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").iterdir())
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "tensorboard").exists()


@pytest.mark.parametrize("options", [["data.cache=host"], ["data.cache=device", "data.cache_decode=device"]],
                         ids=["host", "device-decode"])
def test_killed_cached_run_resumes_to_the_same_weights(shards, tmp_path, options):
    assert_killed_run_resumes_exactly(shards, tmp_path, *options)
    on_device = "decoded on cpu into cpu memory" in (tmp_path / "killed" / "logs" / "rank0.log").read_text()
    assert on_device == ("data.cache_decode=device" in options)  # the option took the fill's other path


@pytest.mark.parametrize("name,size", [("crop178_resize", (64, 64)), ("resize_crop", (218, 178)),
                                       ("imagenet", (32, 32))])
def test_device_decode_caches_the_samples_of_the_cpu_decode(shards, name, size):
    """data.cache_decode=device: the JPEGs decoded by TorchCodec's decode_jpeg on the cache's device (here
    the CPU; nvJPEG serves the same call on a GPU) and resampled there. The same samples at the same cache
    positions with the same labels, for the training and the evaluation forms; the pixels differ only by
    where the resampling starts: within rounding where the CPU path decodes at full size too (resize_crop),
    by a few levels on average where it decodes at a DCT scale."""
    data = ShardData(str(shards), "all")
    parts = deal_shards(data.split("val").shards, 2, 1)
    for train in (True, False):
        form = build_cached_form(name, image_size=size, train=train)
        kw = dict(size=form.size, num_attributes=40, device=torch.device("cpu"), pin=False, num_workers=2,
                  where="val")
        cpu = fill_store(parts, data.decoder(form.base), **kw)
        dev = fill_store(parts, data.decoder(form.base), device_resample=form.resample, **kw)
        assert dev.keys == cpu.keys and not dev.missing and torch.equal(dev.labels, cpu.labels)
        assert dev.images.shape == cpu.images.shape == (len(cpu.keys), 3, *form.size)
        diff = (dev.images.float() - cpu.images.float()).abs()
        if name == "resize_crop":
            assert diff.max() <= 1, (train, diff.max())
        else:
            assert 0 < diff.mean() < 4, (train, diff.mean())


def test_device_decode_leaves_a_chunk_it_cannot_decode_to_the_cpu(shards, tmp_path):
    """A damaged JPEG makes decode_jpeg refuse its chunk (one shard here): that chunk is decoded on the CPU,
    bit for bit as without the option, so the undecodable sample is skipped and named as there."""
    import shutil

    from test_damaged_samples import damage_jpeg, wipe_header

    copy = Path(shutil.copytree(shards, tmp_path / "shards"))
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = copy / manifest["splits"]["val"]["shards"][1]["file"]
    key = damage_jpeg(shard, 3, wipe_header)
    data = ShardData(str(copy), "all")
    parts = deal_shards(data.split("val").shards, 1, 0)
    form = build_cached_form("crop178_resize", image_size=(64, 64), train=True)
    kw = dict(size=form.size, num_attributes=40, device=torch.device("cpu"), pin=False, num_workers=2, where="val")
    cpu = fill_store(parts, data.decoder(form.base, skip_bad=True), **kw)
    dev = fill_store(parts, data.decoder(form.base, skip_bad=True), device_resample=form.resample, **kw)
    assert dev.keys == cpu.keys and dev.missing == cpu.missing and len(dev.missing) == 1
    assert [k for k, _ in dev.issues.skipped] == [k for k, _ in cpu.issues.skipped] == [key]
    damaged = [i for i, part in enumerate(parts) if part.path == str(shard)][0]
    lo, hi = dev.offsets[damaged], dev.offsets[damaged] + manifest["splits"]["val"]["shards"][1]["num_samples"]
    kept = [i for i in range(lo, hi) if i not in dev.missing]  # a skipped sample's slot is never written
    assert torch.equal(dev.images[kept], cpu.images[kept])  # the damaged shard's chunk: the CPU's decode
    assert not torch.equal(dev.images[:lo], cpu.images[:lo])  # the others: the device's


def test_device_decode_needs_the_device_cache():
    from celeba_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.cache_decode=device .* needs data.cache=device, not 'host'"):
        load_config("smiling_simple_cnn", ["data.cache=host", "data.cache_decode=device"])
    with pytest.raises(ConfigError, match="data.cache_decode: 'gpu' is not one of"):
        load_config("smiling_simple_cnn", ["data.cache=device", "data.cache_decode=gpu"])


def test_two_process_device_cache_holds_one_share_per_rank(shards, tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = train_cmd(shards, run_dir, "data.cache=device", "train.epochs=1", processes=2)
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    total = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["num_samples"]
    counts = []
    for rank in (0, 1):
        text = (run_dir / "logs" / f"rank{rank}.log").read_text()
        counts.append(int(re.search(rf"train \(rank {rank}\) cache: (\d+) samples", text).group(1)))
    assert sum(counts) == total and abs(counts[0] - counts[1]) <= 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((shards / "manifest.json").read_text())
    for split in ("val", "test"):  # evaluation checked every sample once against the manifest
        assert metrics[split]["mean"]["num_samples"] == manifest["splits"][split]["num_samples"]


def test_a_fill_forks_its_workers_only_once_the_order_thread_is_idle(shards, monkeypatch):
    """The next epoch's order is worked out in a thread while training runs; the validation cache's fill forks
    loader workers at the epoch's end, and a fork while that thread holds a lock (torch's thread pool's, say)
    could leave the lock held for ever in the child. The fill waits for the thread first."""
    import celeba_dist.data.cache as cache_module

    data = ShardData(str(shards), ["Smiling"])
    kw = dict(batch_size=8, rank=0, world_size=1, num_workers=1, seed=0, shuffle_buffer=50)
    train = cached(data, "imagenet", (32, 32), **kw)
    slow_order = train.epoch_order

    def epoch_order(epoch):
        time.sleep(1.5)
        return slow_order(epoch)

    monkeypatch.setattr(train, "epoch_order", epoch_order)
    real_loader, idle_at_fork = cache_module.make_loader, []

    def make_loader(*args, **kwargs):
        idle_at_fork.append(all(f.done() for f in train._ahead.values()))
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(cache_module, "make_loader", make_loader)
    train.epoch = 0
    next(iter(train))  # epoch 0 starts: epoch 1's order is now being worked out in the thread
    assert train._ahead and not any(f.done() for f in train._ahead.values())
    form = build_cached_form("imagenet", image_size=(32, 32), train=False)
    fill_store(deal_shards(data.split("val").shards, 1, 0), data.decoder(form.base), size=form.size,
               num_attributes=1, device=torch.device("cpu"), pin=False, num_workers=1, where="val")
    assert idle_at_fork == [True]
    assert len(epoch_batches(train, 1)) == train.steps_per_epoch  # the order worked out ahead is the one used
    train.close()


def test_a_sample_skipped_by_the_fill_is_never_served_and_is_reported_once_an_epoch(shards, tmp_path):
    """``data.skip_bad_samples`` with a cache: the undecodable sample's empty slot is never gathered into a
    batch (its key, or a blank image under key ""), and the fill's issues come with one batch of each epoch."""
    import shutil

    from test_damaged_samples import damage_jpeg, wipe_header

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    bad = damage_jpeg(copy / "train" / "celeba-train-000000.tar", 3, wipe_header)
    data = ShardData(str(copy), ["Smiling", "Male"])
    kw = dict(batch_size=8, rank=0, world_size=1, num_workers=0, seed=5, shuffle_buffer=50)
    stream = train_stream(data, build_transform("imagenet", image_size=(32, 32), train=True), skip_bad=True, **kw)
    form = build_cached_form("imagenet", image_size=(32, 32), train=True)
    store = fill_store(stream.rank_parts(), data.decoder(form.base, skip_bad=True), size=form.size,
                       num_attributes=2, device=torch.device("cpu"), pin=False, num_workers=0, where="test")
    assert len(store.missing) == 1 and bad not in store.keys
    cache = CachedTrain(stream, store, form, device=torch.device("cpu"))
    for epoch in (0, 1):
        batches = epoch_batches(cache, epoch)
        keys = [k for b in batches for k in b.keys]
        assert len(batches) == stream.steps_per_epoch and len(keys) == stream.steps_per_epoch * 8
        assert "" not in keys and bad not in keys
        assert [[key for key, _ in b.issues.skipped] for b in batches if b.issues] == [[bad]]
    cache.close()


def test_a_stop_request_ends_the_fill_after_its_current_chunk(shards):
    """A stop signal while the cache fills (``stopped()`` turning true) ends the fill at once, leaving the
    store unfinished for the caller to stop on, rather than decoding the whole share first."""
    from celeba_dist.data.cache import part_size

    data = ShardData(str(shards), "all")
    form = build_cached_form("crop178_resize", image_size=(16, 16), train=False)
    parts = deal_shards(data.split("train").shards, 1, 0)
    asked = []
    store = fill_store(parts, data.decoder(form.base), size=form.size, num_attributes=40, device=torch.device("cpu"),
                       pin=False, num_workers=0, where="test", stopped=lambda: bool(asked.append(1)) or len(asked) > 1)
    first = part_size(parts[0])
    assert len(asked) == 2
    assert [bool(k) for k in store.keys] == [True] * first + [False] * (len(store.keys) - first)


def test_cached_evaluation_leaves_out_a_sample_the_fill_skipped(shards, tmp_path):
    """An evaluation split cached with ``data.skip_bad_samples``: the undecodable sample is not evaluated (no
    blank image under key "" with all-zero labels), every other sample is, once, and the skip is reported."""
    import shutil

    from test_damaged_samples import damage_jpeg, wipe_header

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    bad = damage_jpeg(copy / "val" / "celeba-val-000000.tar", 1, wipe_header)
    data = ShardData(str(copy), "all")
    form = build_cached_form("crop178_resize", image_size=(32, 32), train=False)
    parts = deal_shards(data.split("val").shards, 1, 0)
    store = fill_store(parts, data.decoder(form.base, skip_bad=True), size=form.size, num_attributes=40,
                       device=torch.device("cpu"), pin=False, num_workers=0, where="val")
    batches = list(CachedEval(store, batch_size=7, device=torch.device("cpu")))
    keys = [k for b in batches for k in b.keys]
    assert bad not in keys and "" not in keys
    assert len(keys) == len(set(keys)) == data.split("val").num_samples - 1
    assert sum(len(b.labels) for b in batches) == sum(len(b.images) for b in batches) == len(keys)
    assert [[key for key, _ in b.issues.skipped] for b in batches if b.issues] == [[bad]]
