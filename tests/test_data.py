"""The shard loader on real packed shards: exact evaluation coverage, equal training batches per rank."""
from __future__ import annotations

import json
import os

import pytest
import torch
import webdataset as wds

from celeba_dist.data.streams import ShardData, TrainStream, deal_shards, eval_stream, make_loader, train_stream
from celeba_dist.data.transforms import build_transform
from shardkit import synthetic_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 150 images: ~121 train / 15 val / 14 test; 8 per shard gives uneven shards and a short last one
    return synthetic_shards(tmp_path_factory.mktemp("data"), num_images=150, samples_per_shard=8)


def manifest_ids(shards, split):
    """Ids read straight from the tar files with plain webdataset, for comparison."""
    manifest = json.loads((shards / "manifest.json").read_text())
    urls = [str(shards / s["file"]) for s in manifest["splits"][split]["shards"]]
    return sorted(s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False))


def test_deal_shards_is_a_partition():
    for n_shards in (1, 2, 3, 5, 8, 13):
        shards = [(f"s{i}", 10) for i in range(n_shards)]
        for slots in (1, 2, 3, 4, 6, 16):
            seen = []
            for slot in range(slots):
                for part in deal_shards(shards, slots, slot):
                    seen += [(part.path, k) for k in range(10) if k % part.stride == part.offset]
            assert sorted(seen) == sorted((f"s{i}", k) for i in range(n_shards) for k in range(10))


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("split", ["val", "train"])
def test_evaluation_sees_every_sample_exactly_once(shards, world_size, workers, split):
    data = ShardData(str(shards), "all")
    transform = build_transform("crop178_resize", image_size=(32, 32), train=False)
    keys = []
    for rank in range(world_size):
        stream = eval_stream(data, split, transform, batch_size=5, rank=rank, world_size=world_size)
        for images, labels, batch_keys, _ in make_loader(stream, num_workers=workers):
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
            assert labels.shape == (len(batch_keys), 40)
            keys += batch_keys
    assert sorted(keys) == manifest_ids(shards, split)
    assert len(keys) == data.split(split).num_samples


def test_labels_match_the_shards(shards):
    data = ShardData(str(shards), ["Smiling", "Male"])
    manifest = json.loads((shards / "manifest.json").read_text())
    idx = [manifest["attributes"].index(a) for a in ("Smiling", "Male")]
    urls = [str(shards / s["file"]) for s in manifest["splits"]["test"]["shards"]]
    truth = {s["__key__"]: [json.loads(s["attr.json"])[i] for i in idx] for s in wds.WebDataset(urls, shardshuffle=False)}
    stream = eval_stream(data, "test", build_transform("imagenet", image_size=(16, 16), train=False),
                         batch_size=4, rank=0, world_size=1)
    for _, labels, keys, _ in make_loader(stream, num_workers=0):
        for key, row in zip(keys, labels.tolist()):
            assert row == truth[key]


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 2), (3, 1), (2, 3)])
def test_training_epoch_has_equal_batches_on_every_rank(shards, world_size, workers):
    data = ShardData(str(shards), "all")
    transform = build_transform("crop178_resize", image_size=(16, 16), train=True)
    counts, keys, per_rank = [], [], []
    for rank in range(world_size):
        ds = train_stream(data, transform, batch_size=7, rank=rank, world_size=world_size, num_workers=workers,
                          seed=3, shuffle_buffer=20)
        ds.epoch = 1
        batches = list(make_loader(ds, num_workers=workers))
        assert all(len(b[2]) == 7 for b in batches)
        counts.append(len(batches))
        per_rank.append({k for b in batches for k in b[2]})
        keys += [k for b in batches for k in b[2]]
    expected = data.split("train").num_samples // (7 * world_size)
    assert counts == [expected] * world_size
    assert set(keys) <= set(manifest_ids(shards, "train"))
    # No sample is trained on twice in an epoch, within a rank or across ranks; only the remainder of
    # equal batches (fewer than batch_size * world_size samples) sits the epoch out.
    assert len(keys) == len(set(keys)), sorted(k for k in set(keys) if keys.count(k) > 1)
    assert data.split("train").num_samples - len(keys) < 7 * world_size


def test_training_order_is_seeded_and_resumable(shards):
    data = ShardData(str(shards), "all")
    transform = build_transform("crop178_resize", image_size=(16, 16), train=True)

    def run(epoch, skip=0, seed=3):
        ds = train_stream(data, transform, batch_size=4, rank=0, world_size=1, num_workers=2, seed=seed,
                          shuffle_buffer=16)
        ds.epoch, ds.skip_batches = epoch, skip
        return list(make_loader(ds, num_workers=2))

    full = run(0)
    assert [b[2] for b in full] == [b[2] for b in run(0)]  # same seed and epoch: same order
    assert [b[2] for b in full] != [b[2] for b in run(1)]  # another epoch: another order
    resumed = run(0, skip=5)
    assert [b[2] for b in resumed] == [b[2] for b in full[5:]]
    for a, b in zip(resumed, full[5:]):  # the augmentations too (flips are seeded per sample)
        assert torch.equal(a[0], b[0])


def test_fewer_shards_than_slots_still_feeds_every_rank(shards):
    data = ShardData(str(shards), "all")
    transform = build_transform("crop178_resize", image_size=(16, 16), train=False)
    test_shards = data.split("test").shards
    world = len(test_shards) + 3  # more ranks than shards
    seen = []
    for rank in range(world):
        stream = eval_stream(data, "test", transform, batch_size=3, rank=rank, world_size=world)
        seen += [k for b in make_loader(stream, num_workers=2) for k in b[2]]
    assert sorted(seen) == manifest_ids(shards, "test")


@pytest.mark.parametrize("window", [1 << 20, 700], ids=["1MiB", "700B"])
def test_tar_reader_matches_webdataset(shards, tmp_path, monkeypatch, window):
    """Our fast reader yields exactly what webdataset reads from the same shards, long names included; also
    when it reads through a window smaller than a member (headers and JPEGs across window edges)."""
    from celeba_dist.shards import tario
    from celeba_dist.shards.tario import iter_samples

    monkeypatch.setattr(tario, "WINDOW", window)

    manifest = json.loads((shards / "manifest.json").read_text())
    urls = [str(shards / s["file"]) for split in ("train", "test") for s in manifest["splits"][split]["shards"]]
    # and a tar with a 120-character member name (a GNU long-name or pax header), written by webdataset
    long = tmp_path / "long.tar"
    with open(long, "wb") as fh, wds.TarWriter(fh) as writer:
        writer.write({"__key__": "d" * 110 + "/000001", "jpg": b"\xff\xd8abc", "attr.json": b"[1, 0]"})
        writer.write({"__key__": "000002", "jpg": b"", "attr.json": b"[0, 1]"})
    for url in [*urls, str(long)]:
        ours = list(iter_samples(url))
        theirs = [dict(s) for s in wds.WebDataset(url, shardshuffle=False, empty_check=False)]
        assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs]
        for a, b in zip(ours, theirs):
            assert {k: a[k] for k in a if not k.startswith("__")} == {k: b[k] for k in b if not k.startswith("__")}


def test_shard_index_reads_what_the_walk_reads(shards, tmp_path):
    """Reading through a ShardIndex gives what the header walk gives, for every selection; a read past what
    was indexed is walked."""
    from celeba_dist.data.streams import SAMPLE_FIELDS
    from celeba_dist.shards.tario import index_shard, iter_samples

    manifest = json.loads((shards / "manifest.json").read_text())
    paths = [str(shards / s["file"]) for s in manifest["splits"]["train"]["shards"]]
    selections = [dict(), dict(start=3), dict(limit=5), dict(start=2, limit=7), dict(stride=3, offset=1),
                  dict(start=1, limit=8, stride=2, offset=0), dict(start=4, limit=4), dict(start=20)]
    for path in paths:
        index = index_shard(path, SAMPLE_FIELDS)
        assert index.keys == [s["__key__"] for s in iter_samples(path)]
        for where in selections:
            assert list(index.samples(**where)) == list(iter_samples(path, SAMPLE_FIELDS, **where)), where
        part = index_shard(path, SAMPLE_FIELDS, limit=3)
        assert part.keys == index.keys[:3]
        assert list(part.samples(limit=6)) == list(iter_samples(path, SAMPLE_FIELDS, limit=6))
        assert list(part.samples()) == list(iter_samples(path, SAMPLE_FIELDS))


def test_a_shard_changed_under_its_index_is_an_error_naming_it(shards, tmp_path):
    """A shard replaced, or cut short in place, after the run indexed it: the read raises
    ShardChangedError naming the file (never stale offsets into another file, never a SIGBUS)."""
    import shutil

    from celeba_dist.data.streams import SAMPLE_FIELDS
    from celeba_dist.shards.tario import ShardChangedError, index_shard

    manifest = json.loads((shards / "manifest.json").read_text())
    paths = [str(shards / s["file"]) for s in manifest["splits"]["train"]["shards"]]
    copy = tmp_path / "shard.tar"
    shutil.copyfile(paths[0], copy)
    index = index_shard(str(copy), SAMPLE_FIELDS)
    shutil.copyfile(paths[1], copy)  # another shard under the indexed name
    with pytest.raises(ShardChangedError, match=f"{copy}: changed on disk since the run indexed it"):
        list(index.samples())
    shutil.copyfile(paths[0], copy)
    index = index_shard(str(copy), SAMPLE_FIELDS)
    reading = index.samples()
    first = next(reading)  # the file was checked when the read began
    os.truncate(copy, index.spans[index.firsts[3]])  # cut short in place, inside the 4th sample
    assert bytes(first["jpg"])[:2] == b"\xff\xd8"
    with pytest.raises(ShardChangedError, match=f"{copy}: cut short while the run read it: sample "
                                                f"{index.keys[3]} ends at byte"):
        list(reading)
    with pytest.raises(ShardChangedError, match="changed on disk"):  # and the next read says so at once
        next(index.samples())


def test_a_shard_replaced_by_one_of_the_same_size_is_an_error_naming_it(shards, tmp_path):
    """A shard rewritten with the same size but another layout (its samples in another order, as a new pack
    may write them): the index's offsets would cut the new file's members wrongly and pair keys with other
    samples' bytes; its modification time tells, and the read raises ShardChangedError naming the file."""
    import shutil

    from celeba_dist.data.streams import SAMPLE_FIELDS
    from celeba_dist.pack.verify import read_tar_samples
    from celeba_dist.pack.writer import SHARD_MODE, SHARD_MTIME, SHARD_USER
    from celeba_dist.shards.tario import ShardChangedError, index_shard

    manifest = json.loads((shards / "manifest.json").read_text())
    source = shards / manifest["splits"]["train"]["shards"][0]["file"]
    copy = tmp_path / "shard.tar"
    shutil.copyfile(source, copy)
    index = index_shard(str(copy), SAMPLE_FIELDS)
    with open(copy, "wb") as fh, wds.TarWriter(fh, user=SHARD_USER, group=SHARD_USER, mode=SHARD_MODE,
                                               mtime=SHARD_MTIME, encoder=False) as writer:  # as the packer writes
        for key, members in read_tar_samples(str(source))[::-1]:
            writer.write({"__key__": key, **members})
    assert copy.stat().st_size == source.stat().st_size and copy.read_bytes() != source.read_bytes()
    with pytest.raises(ShardChangedError, match=f"{copy}: changed on disk since the run indexed it"):
        list(index.samples())


def test_a_shard_cut_short_during_a_walk_is_an_error_naming_it(shards, tmp_path, monkeypatch):
    """The walk reads a window at a time; a shard cut short in place between two windows is a TarFormatError
    naming the file and the offset where it ends now, never a SIGBUS."""
    import shutil

    from celeba_dist.shards import tario

    monkeypatch.setattr(tario, "WINDOW", 4096)
    manifest = json.loads((shards / "manifest.json").read_text())
    copy = tmp_path / "shard.tar"
    shutil.copyfile(shards / manifest["splits"]["train"]["shards"][0]["file"], copy)
    reading = tario.iter_samples(str(copy))
    assert bytes(next(reading)["jpg"])[:2] == b"\xff\xd8"
    os.truncate(copy, copy.stat().st_size // 2)
    with pytest.raises(tario.TarFormatError, match=f"{copy} at byte \\d+: the file ends at byte \\d+: cut short "
                                                   "while it was read"):
        list(reading)


def test_training_epochs_read_through_the_index_in_the_workers(shards, monkeypatch):
    """The loader indexes the rank's shards in the training process, once; its forked workers then read
    every epoch without walking a tar (a walk here raises), and the batches are those of a plain read."""
    import celeba_dist.shards.tario as tario

    data = ShardData(str(shards), "all")
    transform = build_transform("crop178_resize", image_size=(16, 16), train=True)

    def stream():
        return train_stream(data, transform, batch_size=4, rank=1, world_size=2, num_workers=2, seed=3,
                            shuffle_buffer=20)

    def epoch(ds, number):
        ds.epoch = number
        return list(make_loader(ds, num_workers=2))

    plain = [epoch(stream(), e) for e in (0, 1)]  # each a fresh stream: indexed then read, epoch by epoch
    indexed = stream()
    first = epoch(indexed, 0)
    assert set(indexed._index) == {part.path for part in indexed.rank_parts()}

    def walked(*args, **kwargs):
        raise AssertionError("a tar was walked after the run indexed its shards")

    monkeypatch.setattr(tario, "_sample_spans", walked)  # the walk under iter_samples and index_shard
    second = epoch(indexed, 1)
    for got, want in zip([first, second], plain):
        assert [b.keys for b in got] == [b.keys for b in want]
        assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(got, want))
    with pytest.raises(AssertionError, match="walked"):  # the check itself bites: a fresh stream must walk
        epoch(stream(), 1)


def test_truncated_shard_is_an_error_naming_it(shards, tmp_path):
    """Cut inside a member, at a member's boundary (no end-of-archive marker), or to nothing: each is a
    TarFormatError naming the file; the walk and the index agree."""
    from celeba_dist.shards.tario import TarFormatError, index_shard, iter_samples

    manifest = json.loads((shards / "manifest.json").read_text())
    source = shards / manifest["splits"]["train"]["shards"][0]["file"]
    whole = source.read_bytes()
    boundary = index_shard(str(source)).spans[index_shard(str(source)).firsts[2]] - 512  # the 3rd sample's header
    for cut, reason in [(3000, "truncated tar member"), (boundary, "without the tar end-of-archive marker"),
                        (0, "without the tar end-of-archive marker")]:
        broken = tmp_path / f"broken-{cut}.tar"
        broken.write_bytes(whole[:cut])
        for read in (lambda: list(iter_samples(str(broken))), lambda: index_shard(str(broken))):
            with pytest.raises(TarFormatError, match=f"broken-{cut}.tar at byte .*{reason}"):
                read()


def _coverage(shards: list[tuple[str, int]], world: int, workers: int, batch_size: int) -> tuple[int, int]:
    """(samples an epoch reads, of them read more than once) over every slot of every rank, as intervals.

    Also checks that each rank's share is the same in every epoch (what ``data.cache`` holds) and that each
    epoch's parts of a worker lie inside its rank's share."""
    steps = sum(n for _, n in shards) // (batch_size * world)
    intervals = []
    for rank in range(world):
        ds = TrainStream(shards, None, batch_size=batch_size, rank=rank, world_size=world, num_workers=workers,
                         steps_per_epoch=steps, seed=0, shuffle_buffer=1)
        share: dict[str, list[tuple[int, int]]] = {}
        for p in ds.rank_parts():
            share.setdefault(p.path, []).append((p.start, p.limit))
        for epoch in (3, 4):
            ds.epoch = epoch
            for worker, parts in enumerate(ds.epoch_parts()):
                assert sum(p.limit - p.start for p in parts) == ds.quota(worker)[1] * batch_size
                assert all(any(a <= p.start and p.limit <= b for a, b in share[p.path]) for p in parts)
                if epoch == 3:
                    intervals += [(p.path, p.start, p.limit) for p in parts]
    intervals.sort()
    repeated = sum(max(0, prev[2] - cur[1]) for prev, cur in zip(intervals, intervals[1:]) if prev[0] == cur[0])
    return sum(b - a for _, a, b in intervals), repeated


@pytest.mark.parametrize("per_shard", [256, 64])
def test_training_deals_samples_so_an_epoch_never_repeats_one_at_any_scale(per_shard):
    """Full CelebA's 162,770 training images, world sizes 1 to 128, 0 to 8 workers: every epoch reads each
    sample at most once, and leaves out only the remainder of equal batches (dealing shards, 64 ranks x 8
    workers repeated 14 % of an epoch)."""
    total = 162_770
    shards = [(f"train-{i:06d}.tar", min(per_shard, total - i * per_shard)) for i in range(-(-total // per_shard))]
    for world in (1, 2, 3, 5, 8, 16, 31, 64, 100, 128):
        for workers in range(9):
            read, repeated = _coverage(shards, world, workers, batch_size=16)
            assert repeated == 0, (world, workers)
            assert total - read < 16 * world, (world, workers, read)
            assert read / total >= 0.985


def test_the_leading_attributes_alone_get_only_their_own_labels(shards):
    """The manifest's first attributes, in its order (the compact-label fast path's case): each row holds
    those labels alone, never every label the shard stores."""
    manifest = json.loads((shards / "manifest.json").read_text())
    names = manifest["attributes"][:2]
    data = ShardData(str(shards), names)
    urls = [str(shards / s["file"]) for s in manifest["splits"]["val"]["shards"]]
    truth = {s["__key__"]: json.loads(s["attr.json"])[:2] for s in wds.WebDataset(urls, shardshuffle=False)}
    stream = eval_stream(data, "val", build_transform("imagenet", image_size=(16, 16), train=False),
                         batch_size=4, rank=0, world_size=1)
    seen = 0
    for _, labels, keys, _ in make_loader(stream, num_workers=0):
        assert labels.shape == (len(keys), 2)
        assert labels.tolist() == [truth[key] for key in keys]
        seen += len(keys)
    assert seen == len(truth) == data.split("val").num_samples


def test_the_samples_an_epoch_leaves_out_differ_from_epoch_to_epoch(shards):
    """Only the remainder of equal batches sits an epoch out, and a different one each epoch: no training
    sample is left out of every epoch of a run."""
    data = ShardData(str(shards), "all")
    transform = build_transform("crop178_resize", image_size=(16, 16), train=True)
    train = set(manifest_ids(shards, "train"))
    left_out = []
    for epoch in range(4):
        ds = train_stream(data, transform, batch_size=7, rank=0, world_size=1, num_workers=0, seed=3,
                          shuffle_buffer=20)
        ds.epoch = epoch
        keys = [k for b in make_loader(ds, num_workers=0) for k in b.keys]
        assert len(keys) == len(set(keys)) == ds.steps_per_epoch * 7
        left_out.append(frozenset(train - set(keys)))
    assert all(len(s) == len(train) % 7 for s in left_out)
    assert len(set(left_out)) > 1, left_out
    assert not frozenset.intersection(*left_out)


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 2)])
def test_a_training_subset_reads_its_first_samples_and_no_others(shards, world_size, workers):
    """``data.train_subset=N``: an epoch reads only the split's first N samples (in manifest order), each once,
    though N ends inside a shard."""
    data = ShardData(str(shards), "all")
    first = manifest_ids(shards, "train")[:50]
    assert data.split("train").shards[0][1] < 50 and 50 % 8  # the subset ends inside a shard
    transform = build_transform("crop178_resize", image_size=(16, 16), train=True)
    keys = []
    for rank in range(world_size):
        ds = train_stream(data, transform, batch_size=5, rank=rank, world_size=world_size, num_workers=workers,
                          seed=3, shuffle_buffer=20, subset=50)
        keys += [k for b in make_loader(ds, num_workers=workers) for k in b.keys]
    assert len(keys) == len(set(keys)) == 50 // (5 * world_size) * 5 * world_size
    assert set(keys) <= set(first), sorted(set(keys) - set(first))


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_the_ranks_sha256_shares_check_every_shard_once(shards, tmp_path, processes):
    """``data.check_shards=sha256`` hashes one share of the shards per rank (``part=(rank, ranks)``): together
    the shares name every damaged shard exactly once, whatever the number of ranks."""
    import shutil

    from celeba_dist.shards.manifest import shard_problems

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    files = [s["file"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]
    damaged = files[::4]
    for name in damaged:  # same size: only the hash tells
        data = bytearray((copy / name).read_bytes())
        data[1500] ^= 0xFF
        (copy / name).write_bytes(bytes(data))
    assert shard_problems(manifest, copy, ["train", "val"]) == []
    found = [p for rank in range(processes)
             for p in shard_problems(manifest, copy, ["train", "val"], sha256=True, part=(rank, processes))]
    assert sorted(found) == sorted(f"{name}: sha256 differs from the manifest (damaged or replaced)"
                                   for name in damaged)
