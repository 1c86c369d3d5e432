"""Streaming the packed shards into batches, with exact sample accounting across ranks and workers.

The unit of work is a *slot*: one loader worker of one rank (``rank * workers + worker``).

Evaluation deals whole shards to slots (:func:`deal_shards`); when there are fewer shards than
slots, several slots share a shard and each keeps every ``stride``-th sample of it. Each slot reads
its share once: every sample of the split is seen exactly once across all ranks and workers (no
padding, no duplicates).

Training gives every rank the same number of batches per epoch, so DDP never waits on a rank that
ran dry (the classic WebDataset + DDP hang), and deals *samples*, not shards (:func:`deal_samples`).
Each rank owns a fixed share of the training set for the whole run (consecutive runs of a seeded
shard order, cut at sample boundaries, sizes differing by at most one): that share is what
``data.cache`` decodes once and keeps. Every epoch the rank's parts are put in the epoch's seeded
order and cut into consecutive runs of exactly each worker's quota. No sample is read twice in an
epoch, at any scale; only the remainder of equal batches (fewer than ``batch_size`` samples per
rank) sits the epoch out, a different one each epoch. Samples are shuffled in a seeded buffer, and
the random augmentations of each sample are seeded by (seed, epoch, sample id): an epoch's batches
are a pure function of (seed, epoch, world size, workers), which is what makes mid-epoch
resumption exact, and what lets the cache replay the very same batches.

Samples come out of the tars through :mod:`celeba_dist.shards.tario` (webdataset's grouping, a
faster reader; in training through a :class:`~celeba_dist.shards.tario.ShardIndex` of the rank's
shards, walked once per run) and are shuffled by webdataset's ``shuffle``. The loader is kept out of
``accelerator.prepare()`` on purpose: Accelerate would re-shard an already split stream.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import random
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from celeba_dist import signals
from celeba_dist.data.remote import fetch as fetch_remote
from celeba_dist.data.remote import RemoteReadError, is_remote, iter_remote_samples, remote_join
from celeba_dist.data.transforms import collect_jpeg_damage, stop_collecting_jpeg_damage
from celeba_dist.shards.manifest import (MANIFEST_NAME, ManifestError, load_manifest, shard_problems, split_shards,
                                         validate_manifest)
from celeba_dist.shards.layout import decode_labels, label_bits
from celeba_dist.shards.tario import ShardIndex, index_shard, iter_samples

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """A shard or a sample cannot be read; the message names the shard file and the sample."""


class ShardCheckError(ManifestError):
    """Shards the manifest lists are missing or differ from it (found before training starts)."""


@dataclass(frozen=True)
class ShardPart:
    """The samples of one shard that one slot reads: indices ``i`` in ``[start, limit)`` with
    ``i % stride == offset``."""

    path: str
    stride: int = 1
    offset: int = 0
    limit: int = -1  # -1: to the end of the shard
    start: int = 0


def deal_shards(shards: list[tuple[str, int]], num_slots: int, slot: int) -> list[ShardPart]:
    """The parts of ``shards`` that ``slot`` of ``num_slots`` reads; over all slots, a partition."""
    if not 0 <= slot < num_slots:
        raise ValueError(f"slot {slot} not in [0, {num_slots})")
    if not shards:
        return []
    if len(shards) >= num_slots:
        return [ShardPart(path, limit=n) for i, (path, n) in enumerate(shards) if i % num_slots == slot]
    # Fewer shards than slots: shard j is shared by the slots i with i % len(shards) == j.
    j = slot % len(shards)
    sharing = len(range(j, num_slots, len(shards)))
    return [ShardPart(shards[j][0], stride=sharing, offset=slot // len(shards), limit=shards[j][1])]


def sample_range(shards: list[tuple[str, int]], begin: int, end: int) -> list[ShardPart]:
    """The parts of ``shards`` (in their order) that hold samples ``[begin, end)`` of their concatenation."""
    parts, offset = [], 0
    for path, n in shards:
        lo, hi = max(begin - offset, 0), min(end - offset, n)
        if lo < hi:
            parts.append(ShardPart(path, start=lo, limit=hi))
        offset += n
        if offset >= end:
            break
    return parts


def deal_samples(parts: list[ShardPart], quotas: list[int]) -> list[list[ShardPart]]:
    """Training's dealing: consecutive runs of the concatenated ``parts`` (in their order, each a
    ``[start, limit)`` range of a shard), ``quotas[i]`` samples for slot ``i``, cut at sample boundaries.

    No sample goes to two slots and every slot gets exactly its quota, whatever the shard count and
    sizes; the samples past ``sum(quotas)`` go to no one. Each slot reads its shards front to back.
    """
    total = sum(p.limit - p.start for p in parts)
    if sum(quotas) > total:
        raise ValueError(f"the slots' quotas ({sum(quotas)} samples) exceed the {total} samples of the shards")
    dealt: list[list[ShardPart]] = [[] for _ in quotas]
    remaining = iter(parts)
    part, pos = ShardPart("", limit=0), 0
    for slot, quota in enumerate(quotas):
        while quota > 0:
            if pos >= part.limit:
                part = next(remaining)
                pos = part.start
                continue
            take = min(quota, part.limit - pos)
            dealt[slot].append(ShardPart(part.path, start=pos, limit=pos + take))
            pos, quota = pos + take, quota - take
    return dealt


def subset_shards(shards: list[tuple[str, int]], limit: int) -> list[tuple[str, int]]:
    """The first shards (in manifest order) holding ``limit`` samples; the last one is read only in part."""
    out, total = [], 0
    for path, n in shards:
        if total >= limit:
            break
        take = min(n, limit - total)
        out.append((path, take))
        total += take
    return out


SAMPLE_FIELDS = frozenset({"jpg", "attr.json"})  # what the Decoder reads; a sample's other members are skipped


def read_part(part: ShardPart, index: ShardIndex | None = None) -> Iterator[dict]:
    """Raw samples (``__key__``, ``__url__``, ``jpg`` and ``attr.json``) of one shard part: bytes, or
    memoryviews of each sample's bytes when read through the shard's ``index``.

    Raises :class:`DataError` naming the shard (and, for a damaged one, where in it).
    """
    try:
        if not is_remote(part.path):
            where = dict(start=part.start, limit=part.limit, stride=part.stride, offset=part.offset)
            yield from index.samples(**where) if index else iter_samples(part.path, SAMPLE_FIELDS, **where)
            return
        held = 0  # a remote shard's size cannot be checked before the run: its sample count is, as it is read
        for held, sample in enumerate(iter_remote_samples(part.path, SAMPLE_FIELDS), start=1):
            if 0 <= part.limit < held:
                return
            if held > part.start and (held - 1) % part.stride == part.offset:
                yield sample
        if held < part.limit:
            raise DataError(f"shard {part.path} ends after {held} samples, but the manifest lists at least "
                            f"{part.limit}: it was cut short or replaced; upload it again")
    except RemoteReadError as exc:  # it names the URL and the attempts
        raise DataError(str(exc)) from exc
    except (OSError, ValueError) as exc:  # missing or unreadable file, a tar cut short or damaged
        raise DataError(f"cannot read shard {part.path}: {exc}") from exc


def sample_seed(seed: int, epoch: int, key: str) -> int:
    return zlib.crc32(f"{seed}:{epoch}:{key}".encode())


def _mix(*numbers: int) -> int:
    return zlib.crc32(":".join(map(str, numbers)).encode())


@dataclass
class SampleIssues:
    """Samples that decoded only with libjpeg's warnings, and samples skipped as undecodable
    (``data.skip_bad_samples``): (sample, "shard: what went wrong") pairs, carried with a batch."""

    warned: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.warned or self.skipped)


class Batch(NamedTuple):
    """What the loader yields: uint8 images (B, 3, H, W), 0/1 labels (B, A), sample keys, and the
    data issues met since the previous batch (an evaluation's last batch may hold only those: B = 0)."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    issues: SampleIssues


class IssueTally:
    """The data issues of the batches one process consumed (an epoch, an evaluation), named in its log:
    the first sample that decoded with a libjpeg warning at once, every skipped sample up to
    ``named``, and a summary at the end."""

    def __init__(self, where: str, *, named: int = 20):
        self.where, self.named = where, named
        self.warned: list[str] = []
        self.skipped: list[str] = []

    def add(self, issues: SampleIssues) -> None:
        if not issues:
            return
        if issues.warned and not self.warned:
            key, reason = issues.warned[0]
            log.warning("%s: sample %s decoded with a libjpeg warning (%s): part of its image may be grey or "
                        "garbage; such samples are counted (TensorBoard data/jpeg_warnings), `celeba-dist verify` "
                        "checks the shards' sha256", self.where, key, reason)
        for key, reason in issues.skipped:
            if len(self.skipped) < self.named:
                log.warning("%s: skipped sample %s, it cannot be decoded (%s)", self.where, key, reason)
            self.skipped.append(key)
        self.warned.extend(key for key, _ in issues.warned)

    def log_summary(self) -> None:
        for what, keys in (("decoded with libjpeg warnings", self.warned), ("skipped as undecodable", self.skipped)):
            if keys:
                log.warning("%s: %d sample(s) %s: %s%s", self.where, len(keys), what, ", ".join(keys[:5]),
                            ", ..." if len(keys) > 5 else "")


class _Skipped(NamedTuple):
    key: str
    reason: str


@dataclass(frozen=True)
class Decoder:
    """Raw sample → (uint8 image (3, H, W), label row (A,), key, libjpeg warning or None). Picklable for workers.
    The label row is bytes of 0/1 or a list (:meth:`labels`); :func:`label_table` makes a batch's tensor.

    A sample that cannot be decoded raises :class:`DataError` naming it and its shard, or, with
    ``skip_bad``, comes out as a skipped marker that the batches count.
    """

    transform: Callable[[bytes, random.Random], torch.Tensor]
    label_index: tuple[int, ...]  # positions of the selected attributes in the manifest's order
    skip_bad: bool = False
    every_label: bool = field(init=False)  # label_index is 0, 1, 2, ...: the labels are the stored list

    def __post_init__(self) -> None:
        object.__setattr__(self, "every_label", self.label_index == tuple(range(len(self.label_index))))

    def __call__(self, sample: dict, seed: int = 0) -> tuple[torch.Tensor, bytes | list, str, str | None] | _Skipped:
        return self.many([sample], [seed])[0]

    def many(self, samples: list[dict], seeds: Iterable[int]) -> list:
        """:meth:`__call__` for each of ``samples`` with its seed, in a row (libjpeg's warnings are
        collected once for all of them)."""
        out, transform, labels_of, rng = [], self.transform, self.labels, random.Random
        damage, previous = collect_jpeg_damage()
        try:
            for sample, seed in zip(samples, seeds):
                known = len(damage)
                try:
                    image = transform(sample["jpg"], rng(seed))
                    labels = labels_of(sample["attr.json"])
                except Exception as exc:  # name the sample and shard: the user has to find it
                    out.append(self._failed(sample, exc))
                    continue
                warning = f"{sample.get('__url__')}: {damage[known]}" if len(damage) > known else None
                out.append((image, labels, sample["__key__"], warning))
        finally:
            stop_collecting_jpeg_damage(previous)
        return out

    def _failed(self, sample: dict, exc: Exception) -> _Skipped:
        key, shard = sample.get("__key__"), sample.get("__url__")
        if self.skip_bad:
            return _Skipped(key, f"{shard}: {type(exc).__name__}: {exc}")
        raise DataError(f"cannot decode sample {key} of shard {shard}: {exc}; set data.skip_bad_samples=true "
                        f"to skip such samples, `celeba-dist verify` checks every shard") from exc

    def labels(self, raw: bytes | memoryview) -> bytes | list:
        """The selected labels: bytes of 0/1 for the packer's compact form (a batch's rows are then joined
        and read in one call, :func:`_collate`), a list otherwise."""
        raw = raw if type(raw) is bytes else bytes(raw)  # a memoryview of a sample read through an index
        bits = label_bits(raw)
        if self.every_label and bits is not None and len(bits) == len(self.label_index):
            return bits
        attrs = decode_labels(raw) if bits is None else bits
        return [attrs[i] for i in self.label_index]


def _collate(items: list, issues: SampleIssues) -> Batch:
    if not items:
        return Batch(torch.zeros(0, dtype=torch.uint8), torch.zeros(0), [], issues)
    images, labels, keys, _ = zip(*items)
    return Batch(stack_images(images), label_table(labels), list(keys), issues)


def label_table(rows: Iterable[bytes | list]) -> torch.Tensor:
    """The :class:`Decoder`'s label rows → float32 (B, A); rows of bytes are read in one call."""
    rows = list(rows)
    if not rows:
        return torch.zeros(0)
    if all(type(row) is bytes for row in rows):
        table = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), -1).astype(np.float32)
    else:
        table = np.array([list(row) for row in rows], dtype=np.float32)
    return torch.from_numpy(table)


def stack_images(images: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(3, H, W) uint8 images → (B, 3, H, W). The transforms' images are channel-last arrays seen as
    (3, H, W) (:func:`celeba_dist.data.transforms.to_tensor`): stacking those as (H, W, 3) is one copy of
    contiguous rows, and the batch comes out in channels_last layout, as the models prefer it."""
    rows = [image.permute(1, 2, 0) for image in images]
    if all(row.is_contiguous() for row in rows):
        return torch.stack(rows).permute(0, 3, 1, 2)
    return torch.stack(images)


def _batches(raw: Iterator[dict], decode: Callable[[list[dict]], list], batch_size: int) -> Iterator[Batch]:
    """Raw samples → decoded batches; skipped samples go into the next batch's issues.

    Each batch's samples are taken first and then decoded in a row: the decoder's code and tables stay
    in the CPU caches (about 8 % faster than interleaving every decode with tar reading and shuffling),
    and nothing past the last batch asked for is decoded. More skipped than good samples (beyond one
    batch's worth) means damaged shards, not a few bad images: that ends the run even with
    ``data.skip_bad_samples``.
    """
    batch, issues, good, skipped = [], SampleIssues(), 0, 0
    while chunk := list(itertools.islice(raw, batch_size - len(batch))):
        for item in decode(chunk):
            if isinstance(item, _Skipped):
                issues.skipped.append(tuple(item))
                skipped += 1
                if skipped > max(batch_size, good):
                    raise DataError(f"{skipped} samples could not be decoded against {good} that could (the last: "
                                    f"{item.key} of {item.reason}); the shards look damaged: run `celeba-dist verify`")
                continue
            good += 1
            if item[3]:
                issues.warned.append((item[2], item[3]))
            batch.append(item)
        if len(batch) == batch_size:
            yield _collate(batch, issues)
            batch, issues = [], SampleIssues()
    if batch or issues:
        yield _collate(batch, issues)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class EvalStream(IterableDataset):
    """Every sample of a split exactly once across ranks × workers, in batches (the last may be short)."""

    def __init__(self, shards: list[tuple[str, int]], decoder: Decoder, *, batch_size: int, rank: int, world_size: int):
        super().__init__()
        self.shards, self.decoder, self.batch_size = shards, decoder, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator:
        worker, workers = _worker()
        parts = deal_shards(self.shards, self.world_size * workers, self.rank * workers + worker)
        decoder = self.decoder
        return _batches((s for part in parts for s in read_part(part)),
                        lambda chunk: decoder.many(chunk, itertools.repeat(0)), self.batch_size)


class TrainStream(IterableDataset):
    """A fixed number of shuffled, augmented batches per rank per epoch (see the module docstring).

    Set :attr:`epoch` and :attr:`skip_batches` before creating each epoch's iterator: the
    DataLoader copies the dataset into its workers when the iterator starts.
    """

    def __init__(self, shards: list[tuple[str, int]], decoder: Decoder, *, batch_size: int, rank: int,
                 world_size: int, num_workers: int, steps_per_epoch: int, seed: int, shuffle_buffer: int):
        super().__init__()
        self.shards, self.decoder, self.batch_size = shards, decoder, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.steps_per_epoch, self.seed, self.shuffle_buffer = steps_per_epoch, seed, shuffle_buffer
        self.epoch, self.skip_batches = 0, 0
        self._rank_parts: list[ShardPart] | None = None
        self._index: dict[str, ShardIndex] | None = None

    def quota(self, logical_worker: int, skip: int = 0) -> tuple[int, int]:
        """(batches to skip, batches to deliver) for one logical worker: batch b is worker b % W's."""
        mine = len(range(logical_worker, self.steps_per_epoch, self.workers))
        skipped = len(range(logical_worker, min(skip, self.steps_per_epoch), self.workers))
        return skipped, mine - skipped

    def rank_sizes(self) -> list[int]:
        """Samples in each rank's share of the training set: as equal as they can be."""
        total = sum(n for _, n in self.shards)
        return [total // self.world_size + (r < total % self.world_size) for r in range(self.world_size)]

    def rank_parts(self) -> list[ShardPart]:
        """This rank's share of the training set, the same in every epoch (what ``data.cache`` holds):
        a consecutive run of the shards in a seeded order, cut at sample boundaries."""
        if self._rank_parts is None:
            order = list(self.shards)
            random.Random(_mix(self.seed, -1)).shuffle(order)
            begin = sum(self.rank_sizes()[: self.rank])
            self._rank_parts = sample_range(order, begin, begin + self.rank_sizes()[self.rank])
        return list(self._rank_parts)

    def worker_quotas(self) -> list[int]:
        """Samples per logical worker in one epoch: its batches' worth."""
        return [self.quota(w)[1] * self.batch_size for w in range(self.workers)]

    def epoch_parts(self) -> list[list[ShardPart]]:
        """Each logical worker's share of this rank's samples in this epoch: the rank's parts in the
        epoch's seeded order, dealt by :func:`deal_samples`. What is left over (fewer than
        ``batch_size`` samples of the rank's share) sits this epoch out, others each epoch."""
        parts = self.rank_parts()
        random.Random(_mix(self.seed, self.epoch, self.rank)).shuffle(parts)
        return deal_samples(parts, self.worker_quotas())

    def before_workers(self) -> None:
        """Index this rank's local shards, once per run: called by :func:`make_loader`'s loader in the
        training process before it forks its workers, which inherit the index, so every epoch reads the
        samples without walking the tar headers again (about 10 µs a sample to walk, 3 µs through the
        index). Only the samples the rank reads are walked."""
        if self._index is not None:
            return
        reach: dict[str, int] = {}
        for part in self.rank_parts():
            if not is_remote(part.path):  # how far into the shard the rank reads (-1: to its end)
                known = reach.get(part.path, 0)
                reach[part.path] = -1 if min(known, part.limit) < 0 else max(known, part.limit)
        self._index = {}
        for path, limit in reach.items():
            try:
                self._index[path] = index_shard(path, SAMPLE_FIELDS, limit=limit)
            except (OSError, ValueError) as exc:  # as read_part names them
                raise DataError(f"cannot read shard {path}: {exc}") from exc

    def read(self, part: ShardPart) -> Iterator[dict]:
        """:func:`read_part` through the run's index (:meth:`before_workers`) where it has the shard."""
        return read_part(part, self._index.get(part.path) if self._index else None)

    def worker_samples(self, worker: int, read: Callable[[ShardPart], Iterable] | None = None) -> Iterator:
        """Logical ``worker``'s share of the epoch, shuffled: the items ``read`` gives for its parts (raw
        samples, or :mod:`celeba_dist.data.cache`'s indices); over and over (reshuffled each pass) should
        it need more than its share (only when ``data.skip_bad_samples`` skipped some of it).

        The shuffle buffer works within one pass, so it never reads ahead into the next one. Its
        random draws do not depend on the items, so any ``read`` gives the same order.
        """
        parts = self.epoch_parts()[worker]
        slot = self.rank * self.workers + worker
        read = read or self.read
        for repeat in itertools.count():
            if repeat:
                random.Random(_mix(self.seed, self.epoch, slot, repeat)).shuffle(parts)
            shuffle = wds.shuffle(bufsize=self.shuffle_buffer, initial=min(self.shuffle_buffer, 100),
                                  rng=random.Random(_mix(self.seed, self.epoch, slot, repeat)))
            empty = True
            for item in shuffle(item for part in parts for item in read(part)):
                empty = False
                yield item
            if empty:
                return

    def __iter__(self) -> Iterator:
        worker, _ = _worker()
        # Rotate workers so the first batch after a mid-epoch resume comes from the right one:
        # the DataLoader always asks worker 0 first.
        logical = (worker + self.skip_batches) % self.workers
        skip, deliver = self.quota(logical, self.skip_batches)
        # The batches a mid-epoch resume skips are read but never decoded. (Samples skipped as
        # undecodable, data.skip_bad_samples, are not known then: after one, a resumed epoch
        # differs from an uninterrupted one by that many samples.)
        stream = itertools.islice(self.worker_samples(logical), skip * self.batch_size, None)
        seed, epoch, decoder = self.seed, self.epoch, self.decoder
        produced = 0

        def decode(chunk: list[dict]) -> list:
            return decoder.many(chunk, [sample_seed(seed, epoch, s["__key__"]) for s in chunk])

        for batch in itertools.islice(_batches(stream, decode, self.batch_size), deliver):
            if len(batch.keys) < self.batch_size:
                raise RuntimeError(f"rank {self.rank}, worker {logical} ran out of samples: its shards are empty")
            produced += 1
            yield batch
        if produced != deliver:
            raise RuntimeError(f"rank {self.rank}, worker {logical} delivered {produced} batches instead of {deliver}")


def load_local_manifest(root: str) -> tuple[dict, str]:
    manifest = load_manifest(root)
    return manifest, hashlib.sha256((Path(root) / MANIFEST_NAME).read_bytes()).hexdigest()


def load_remote_manifest(root: str) -> tuple[dict, str]:
    """A remote root's manifest.json, validated like a local one; errors name its URL."""
    url = remote_join(root, MANIFEST_NAME)
    data = fetch_remote(url)
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{url}: not valid JSON: {exc}") from None
    validate_manifest(manifest, where=url)
    return manifest, hashlib.sha256(data).hexdigest()


@dataclass
class SplitInfo:
    num_samples: int
    shards: list[tuple[str, int]]


class ShardData:
    """The packed shards of one folder, read through its manifest."""

    def __init__(self, root: str, attributes: list[str] | str = "all"):
        from celeba_dist.attributes import resolve_attributes

        self.root = root
        self.remote = is_remote(root)
        self.manifest, self.manifest_sha256 = (load_remote_manifest if self.remote else load_local_manifest)(root)
        available = self.manifest["attributes"]
        self.attributes = resolve_attributes(attributes, available)
        self.label_index = tuple(available.index(a) for a in self.attributes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.manifest["splits"]:
            raise ValueError(f"{self.root}: manifest has no split {name!r}; it has {sorted(self.manifest['splits'])}")
        if self.remote:
            shards = [(remote_join(self.root, s["file"]), int(s["num_samples"]))
                      for s in self.manifest["splits"][name]["shards"]]
        else:
            shards = split_shards(self.manifest, self.root, name)
        return SplitInfo(sum(n for _, n in shards), shards)

    def check_files(self, splits: list[str] | tuple[str, ...], *, sha256: bool = False,
                    part: tuple[int, int] = (0, 1)) -> list[str]:
        """Problems with the shard files of ``splits`` (see :func:`celeba_dist.manifest.shard_problems`);
        remote shards are checked as they are read (a missing one ends the run naming its URL)."""
        if self.remote:
            return []
        return shard_problems(self.manifest, self.root, splits, sha256=sha256, part=part)

    def positive_rates(self, split: str = "train") -> list[float]:
        rates = self.manifest["splits"][split]["positive_rates"]
        return [float(rates[a]) for a in self.attributes]

    def decoder(self, transform: Callable[[bytes], torch.Tensor], *, skip_bad: bool = False) -> Decoder:
        return Decoder(transform, self.label_index, skip_bad)


def steps_per_epoch(num_samples: int, *, batch_size: int, world_size: int) -> int:
    """Optimizer-free count of batches each rank takes per epoch: every sample about once."""
    steps = num_samples // (batch_size * world_size)
    if steps < 1:
        raise ValueError(f"{num_samples} training samples cannot fill one batch of {batch_size} "
                         f"on each of {world_size} processes; lower data.batch_size")
    return steps


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP)  # schedulers', a Ctrl-C's, a hangup's


class _Loader(DataLoader):
    """A DataLoader whose worker processes never die of a stop signal sent to the process group.

    PyTorch's workers install a SIGTERM handler of their own as they start (it exits quietly on
    the parent's SIGTERM and dies of anyone else's) before ``worker_init_fn`` runs, so a group
    SIGTERM in that window would kill a worker and crash the run instead of checkpointing it.
    The stop signals are therefore blocked while the workers are forked: they start with them
    blocked, :func:`_ignore_stop_signals` sets them to ignored and only then unblocks them. The
    parent unblocks them right after the fork, and a stop signal that arrived meanwhile is
    delivered to it then.

    A dataset with a ``before_workers()`` method (:class:`TrainStream`) gets it called here, in the
    training process, before any worker starts.
    """

    def __iter__(self):
        prepare = getattr(self.dataset, "before_workers", None)
        if prepare is not None:
            prepare()
        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super().__iter__()
        with signals.uncut():  # a forced Ctrl-C waits until the iterator is whole
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                return super().__iter__()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def make_loader(dataset: IterableDataset, *, num_workers: int, pin_memory: bool = False,
                timeout_s: float = 0.0) -> DataLoader:
    """A DataLoader over a stream that batches itself (batch_size=None).

    It gets a generator of its own: starting an iterator would otherwise draw from the global
    RNG, and a run resumed mid-epoch would then see different dropout masks than an
    uninterrupted one. The streams seed their randomness themselves and do not use it.
    ``timeout_s`` (``data.loader_timeout_s``; 0: none): waiting longer than that for the workers' next batch
    (a worker stuck on a hung filesystem, or deadlocked as it started) raises instead of waiting for ever.
    """
    return _Loader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                   persistent_workers=False, prefetch_factor=4 if num_workers else None, collate_fn=_as_is,
                   timeout=timeout_s if num_workers else 0,
                   generator=torch.Generator().manual_seed(0), worker_init_fn=_ignore_stop_signals)


def _as_is(batch):
    """The streams' batches are made already: no ``default_convert`` walk through every key of every batch."""
    return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers outlive a stop signal sent to the whole process group (as SLURM, a Ctrl-C or a hangup does):
    the training process decides when to stop, checkpoints, and then shuts its workers down
    (:func:`owned_workers` makes sure of it on every path out). They start with the signals
    blocked (see :class:`_Loader`); a pending one is discarded once they are ignored."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def owned_workers(*, grace_s: float = 5.0) -> Iterator[None]:
    """Loader worker processes started inside the block are gone when it ends, whatever happened.

    Workers ignore SIGTERM (above), so after an error neither the DataLoader's ``terminate()``
    nor multiprocessing's exit handler can stop one that is still running; the exit handler then
    joins it forever and the run never ends. On an error, every worker started in the block is
    killed at once (workers hold nothing that needs saving); on a normal exit the DataLoader has
    shut them down already, and any straggler gets ``grace_s`` before it is killed.
    """
    before = set(multiprocessing.active_children())
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        _end_children([p for p in multiprocessing.active_children() if p not in before],
                      grace_s=0.0 if failed else grace_s)


def _end_children(children: list, *, grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))
    stray = [child for child in children if child.is_alive()]
    if not stray:
        return
    # The DataLoader's SIGCHLD handler would report our own kills as worker failures and raise
    # over the error that brought us here: these deaths are ours, so it is off while they happen.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if in_main else None
    try:
        for child in stray:
            child.kill()
        for child in stray:
            child.join(timeout=grace_s + 5.0)
    finally:
        if in_main:
            signal.signal(signal.SIGCHLD, previous)
    log.debug("killed %d loader worker(s): %s", len(stray), [child.pid for child in stray])


def train_stream(data: ShardData, transform: Callable[[bytes], torch.Tensor], *, batch_size: int, rank: int,
                 world_size: int, num_workers: int, seed: int, shuffle_buffer: int, subset: int = 0,
                 skip_bad: bool = False) -> TrainStream:
    info = data.split("train")
    shards = subset_shards(info.shards, subset) if subset else info.shards
    total = min(subset, info.num_samples) if subset else info.num_samples
    steps = steps_per_epoch(total, batch_size=batch_size, world_size=world_size)
    return TrainStream(shards, data.decoder(transform, skip_bad=skip_bad), batch_size=batch_size, rank=rank,
                       world_size=world_size, num_workers=num_workers, steps_per_epoch=steps, seed=seed,
                       shuffle_buffer=shuffle_buffer)


def eval_stream(data: ShardData, split: str, transform: Callable[[bytes], torch.Tensor], *, batch_size: int,
                rank: int, world_size: int, skip_bad: bool = False) -> EvalStream:
    return EvalStream(data.split(split).shards, data.decoder(transform, skip_bad=skip_bad), batch_size=batch_size,
                      rank=rank, world_size=world_size)
