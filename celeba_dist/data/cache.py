"""``data.cache: host | device``: each rank decodes its share once and keeps it in memory.

The first pass decodes every sample of the rank's share (:meth:`TrainStream.rank_parts`, the same in
every epoch; an evaluation split's :func:`deal_shards` share) through the deterministic part of the
transform preset (:func:`celeba_dist.data.transforms.build_cached_form`) into one uint8 tensor, in
pinned host memory (``host``) or on the rank's device (``device``), with the labels and keys beside
it. Loader workers do the decoding; nothing of it is written to disk.

Training then replays the very batches the streaming loader would give (:class:`CachedTrain`): the
same dealing, the same seeded shuffle buffer, run over cache positions instead of raw samples, so the
same seed gives the same sample ids in every batch, and a mid-epoch resume skips exactly the batches
already trained. Each batch is gathered by index and its random crop and flip run vectorised on the
training device, seeded by (seed, epoch, sample id): an epoch is still a pure function of
(seed, epoch). Evaluation iterates its cached share in order (:class:`CachedEval`); the exact-count
check against the manifest is unchanged.
"""
from __future__ import annotations

import concurrent.futures
import copy
import itertools
import logging
import os
import time
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.utils.data import IterableDataset

from celeba_dist.data.streams import (Batch, Decoder, IssueTally, SampleIssues, ShardPart, TrainStream, _Skipped,
                                      _worker, label_table, make_loader, owned_workers, read_part, stack_images)
from celeba_dist.data.transforms import CachedForm, Resample, augment_batch, hash32

log = logging.getLogger(__name__)

MODES = ("none", "host", "device")
HOST_SHARE = 0.9  # of the host's available memory a cache (all ranks of the node together) may take
DEVICE_SHARE = 0.75  # of the device's free memory: the model, its activations and optimizer need the rest
_CHUNK = 256  # samples per fill task
# Training caches whose background thread may be working out an epoch order: a fill waits for them before it
# forks its loader workers (a fork copies only the forking thread; locks another thread holds, in torch's
# thread pool say, would stay held in the child for ever).
_ORDERING: weakref.WeakSet = weakref.WeakSet()


class CacheMemoryError(RuntimeError):
    """The cache does not fit; the message gives the bytes needed and free, and what to change."""


def part_size(part: ShardPart) -> int:
    first = part.start + (part.offset - part.start) % part.stride
    return len(range(first, part.limit, part.stride))


def cache_bytes(num_samples: int, form: CachedForm, num_attributes: int) -> int:
    """Bytes a cache of ``num_samples`` takes: uint8 images, float32 labels, an int64 hash per sample."""
    h, w = form.size
    return num_samples * (3 * h * w + 4 * num_attributes + 8)


def free_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes a cache may take on ``device``, how that was found): a share of the free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEVICE_SHARE), f"{DEVICE_SHARE:.0%} of the {_gib(free)} free on {device}"
    available = host_available()
    return int(available * HOST_SHARE), f"{HOST_SHARE:.0%} of the host's {_gib(available)} available (MemAvailable)"


def host_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def fit_problem(*, needed: int, local_ranks: int, device: torch.device, what: str) -> str | None:
    """Why a cache of ``needed`` bytes per rank does not fit on ``device``, or None if it does. On the
    host, all ``local_ranks`` ranks of the node keep one each."""
    on_host = device.type != "cuda"
    total = needed * (local_ranks if on_host else 1)
    allowed, how = free_bytes(device)
    if total <= allowed:
        return None
    ranks = f"{local_ranks} ranks on this node x {_gib(needed)} = " if on_host and local_ranks > 1 else ""
    return (f"the {what} cache needs {ranks}{_gib(total)} ({total} bytes), more than {how} ({allowed} bytes): "
            "use a smaller data.image_size, "
            + ("data.cache=none, " if on_host else "data.cache=host instead of device, ")
            + "or more ranks (each caches only its share)")


class _FillStream(IterableDataset):
    """The fill's work: the share's parts in chunks of at most :data:`_CHUNK` samples, dealt to the loader
    workers; yields (cache positions, decoded batch) per chunk, or with ``raw`` (first position, raw
    samples) for the training process to decode (:func:`_device_decoded`)."""

    def __init__(self, parts: list[ShardPart], decoder: Decoder, *, raw: bool = False):
        super().__init__()
        self.decoder, self.raw, self.chunks = decoder, raw, []
        offset = 0
        for part in parts:
            if part.stride == 1:
                for lo in range(part.start, part.limit, _CHUNK):
                    hi = min(lo + _CHUNK, part.limit)
                    self.chunks.append((ShardPart(part.path, start=lo, limit=hi), offset + lo - part.start))
            else:
                self.chunks.append((part, offset))
            offset += part_size(part)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Batch] | tuple[int, list[dict]]]:
        worker, workers = _worker()
        for chunk, offset in self.chunks[worker::workers]:
            samples = list(read_part(chunk))
            yield (offset, samples) if self.raw else _decoded(offset, samples, self.decoder)


def _decoded(offset: int, samples: list[dict], decoder: Decoder) -> tuple[torch.Tensor, Batch]:
    """(cache positions, batch) of a chunk of raw samples whose first is at cache position ``offset``,
    decoded by ``decoder`` on the CPU; skipped and warned samples go into the batch's issues."""
    positions, images, labels, keys, issues = [], [], [], [], SampleIssues()
    for i, item in enumerate(decoder.many(samples, itertools.repeat(0))):
        if isinstance(item, _Skipped):
            issues.skipped.append(tuple(item))
            continue
        image, label, key, warning = item
        if warning:
            issues.warned.append((key, warning))
        positions.append(offset + i)
        images.append(image)
        labels.append(label)
        keys.append(key)
    stacked = stack_images(tuple(images)) if images else torch.zeros(0, dtype=torch.uint8)
    return torch.tensor(positions, dtype=torch.int64), Batch(stacked, label_table(labels), keys, issues)


def _device_decoded(offset: int, samples: list[dict], decoder: Decoder, resample: Resample,
                    device: torch.device) -> tuple[torch.Tensor, Batch]:
    """:func:`_decoded`, with the JPEGs decoded in one TorchCodec ``decode_jpeg`` call on ``device`` (nvJPEG
    on a GPU; torchvision's own decoders are deprecated since torchvision 0.29 in TorchCodec's favour) and
    ``resample``d there. A chunk that call refuses (a damaged JPEG, even one libjpeg decodes with a
    warning; another image format; no device memory left) is decoded on the CPU, in this process, as
    without the option, so damaged samples are named, warned about and skipped alike."""
    from torchcodec.decoders import decode_jpeg  # an optional dependency: checked by the config

    try:
        decoded = decode_jpeg([bytes(sample["jpg"]) for sample in samples], mode="RGB", device=device)
        images = torch.stack([resample(image) for image in decoded]) if samples else torch.zeros(0, dtype=torch.uint8)
        labels = label_table(decoder.labels(sample["attr.json"]) for sample in samples)
    except (RuntimeError, ValueError) as exc:
        log.warning("the device decoder refused a chunk of %d samples from %s (%s): decoding it on the CPU",
                    len(samples), samples[0].get("__url__") if samples else "?", str(exc).splitlines()[0][:200])
        return _decoded(offset, samples, decoder)
    positions = torch.arange(offset, offset + len(samples), dtype=torch.int64)
    return positions, Batch(images, labels, [sample["__key__"] for sample in samples], SampleIssues())


@dataclass
class Store:
    """A rank's decoded share: ``images[i]``, ``labels[i]``, ``keys[i]`` for cache position ``i``."""

    parts: list[ShardPart]
    offsets: list[int]  # cache position of each part's first sample
    images: torch.Tensor  # (n, 3, H, W) uint8
    labels: torch.Tensor  # (n, A) float32, on the images' device
    keys: list[str]  # "" where a sample was skipped as undecodable
    key_hash: torch.Tensor  # (n,) int64 crc32 of each key, on the images' device
    issues: SampleIssues = field(default_factory=SampleIssues)  # met while filling
    seconds: float = 0.0

    @property
    def missing(self) -> set[int]:
        return {i for i, key in enumerate(self.keys) if not key}

    def positions(self, part: ShardPart) -> Iterator[int]:
        """Cache positions of ``part``'s samples (a stride-1 range inside one of the share's parts),
        in order, leaving out the samples skipped as undecodable."""
        for own, offset in zip(self.parts, self.offsets):
            if own.path == part.path and own.start <= part.start and part.limit <= own.limit:
                base = offset - own.start
                return (base + i for i in range(part.start, part.limit) if self.keys[base + i])
        raise KeyError(f"{part} is not in this rank's cached share")


def fill_store(parts: list[ShardPart], decoder: Decoder, *, size: tuple[int, int], num_attributes: int,
               device: torch.device, pin: bool, num_workers: int, where: str, timeout_s: float = 0.0,
               device_resample: Resample | None = None, stopped: Callable[[], bool] = lambda: False) -> Store:
    """Decode every sample of ``parts`` once, with ``num_workers`` loader workers, into a new :class:`Store`.

    With ``device_resample`` (``data.cache_decode=device``) the workers only read the samples, and the
    training process decodes each chunk's JPEGs on ``device`` and resamples them there. Once ``stopped()``
    (a stop signal) the fill ends after its current chunk, leaving the store incomplete: the caller stops."""
    started = time.perf_counter()
    offsets = list(itertools.accumulate((part_size(p) for p in parts), initial=0))
    n = offsets.pop()
    images = torch.empty((n, 3, *size), dtype=torch.uint8, device=device, pin_memory=pin and device.type == "cpu")
    labels = torch.zeros((n, num_attributes), dtype=torch.float32, device=device)
    keys, issues, tally = [""] * n, SampleIssues(), IssueTally(f"{where} cache")
    log.info("%s cache: filling with %d samples (%s)", where, n, _gib(images.numel()))
    for train in list(_ORDERING):
        train.settle()
    with owned_workers():
        stream = _FillStream(parts, decoder, raw=device_resample is not None)
        for item in make_loader(stream, num_workers=num_workers, timeout_s=timeout_s):
            positions, batch = item if device_resample is None else _device_decoded(*item, decoder, device_resample,
                                                                                     device)
            if stopped():
                log.warning("%s cache: stop requested, the fill ends unfinished", where)
                break
            tally.add(batch.issues)
            issues.warned += batch.issues.warned
            issues.skipped += batch.issues.skipped
            if not len(positions):
                continue
            index = positions.to(device)
            images.index_copy_(0, index, batch.images.to(device))
            labels.index_copy_(0, index, batch.labels.to(device))
            for pos, key in zip(positions.tolist(), batch.keys):
                keys[pos] = key
    tally.log_summary()
    key_hash = torch.tensor([zlib.crc32(key.encode()) for key in keys], dtype=torch.int64, device=device)
    store = Store(parts, offsets, images, labels, keys, key_hash, issues, time.perf_counter() - started)
    log.info("%s cache: %d samples (%s) decoded%s into %s memory in %.1fs", where, n - len(store.missing),
             _gib(images.numel()), f" on {device}" if device_resample else "", device, store.seconds)
    return store


def epoch_seeds(key_hash: torch.Tensor, *, seed: int, epoch: int) -> torch.Tensor:
    """Each sample's augmentation seed in an epoch: a hash of (seed, epoch, sample id), vectorised."""
    run = int(hash32(torch.tensor([seed * 1_000_003 + epoch], dtype=torch.int64)))
    return hash32(key_hash ^ run)


class _Gather:
    """Batches gathered from a host cache into pinned buffers for an asynchronous copy to the device; a
    buffer is reused only once the copy out of it has finished."""

    def __init__(self, store: Store, device: torch.device, depth: int = 3):
        self.store, self.device = store, device
        self.async_copy = device.type == "cuda" and store.images.device.type == "cpu" and store.images.is_pinned()
        self.buffers: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        self.depth, self.turn = depth, 0

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        images = self.store.images
        if images.device == self.device:
            return images.index_select(0, index.to(images.device))
        if not self.async_copy:
            return images.index_select(0, index).to(self.device)
        if len(self.buffers) < self.depth:
            self.buffers.append((torch.empty((len(index), *images.shape[1:]), dtype=torch.uint8).pin_memory(),
                                 torch.cuda.Event()))
        buffer, done = self.buffers[self.turn]
        self.turn = (self.turn + 1) % self.depth
        done.synchronize()
        out = buffer[: len(index)]
        torch.index_select(images, 0, index, out=out)
        moved = out.to(self.device, non_blocking=True)
        done.record()
        return moved


class CachedTrain:
    """The training batches of a :class:`TrainStream`, served from its rank's :class:`Store`.

    Set :attr:`epoch` and :attr:`skip_batches` before iterating, as with the stream. The next epoch's
    order is worked out in a background thread while this one trains.
    """

    def __init__(self, stream: TrainStream, store: Store, form: CachedForm, *, device: torch.device):
        self.stream, self.store, self.form, self.device = stream, store, form, device
        self.epoch, self.skip_batches = 0, 0
        self.steps_per_epoch = stream.steps_per_epoch
        self._gather = _Gather(store, device)
        self._ahead: dict[int, concurrent.futures.Future] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cache-order")
        _ORDERING.add(self)

    def epoch_order(self, epoch: int) -> list[int]:
        """Cache positions of the epoch's batches, batch after batch: the streaming loader's order (batch
        ``b`` is logical worker ``b % workers``'s)."""
        stream = copy.copy(self.stream)
        stream.epoch = epoch
        batch, workers = stream.batch_size, stream.workers
        per_worker = []
        for worker in range(workers):
            wanted = stream.quota(worker)[1] * batch
            seq = list(itertools.islice(stream.worker_samples(worker, read=self.store.positions), wanted))
            if len(seq) < wanted:
                raise RuntimeError(f"rank {stream.rank}, worker {worker}: the cache holds {len(seq)} of the "
                                   f"{wanted} samples it needs this epoch")
            per_worker.append(seq)
        order = []
        for b in range(self.steps_per_epoch):
            k = b // workers
            order += per_worker[b % workers][k * batch:(k + 1) * batch]
        return order

    def _order(self, epoch: int) -> list[int]:
        future = self._ahead.pop(epoch, None)
        order = future.result() if future is not None else self.epoch_order(epoch)
        self._ahead = {epoch + 1: self._pool.submit(self.epoch_order, epoch + 1)}
        return order

    def __iter__(self) -> Iterator[Batch]:
        store, batch_size = self.store, self.stream.batch_size
        order = self._order(self.epoch)
        order_dev = torch.tensor(order, dtype=torch.int64, device=store.images.device)
        seeds = epoch_seeds(store.key_hash, seed=self.stream.seed, epoch=self.epoch)
        issues = store.issues
        for b in range(self.skip_batches, self.steps_per_epoch):
            index = order_dev[b * batch_size:(b + 1) * batch_size]
            images = self._gather(index)
            labels = store.labels.index_select(0, index).to(self.device, non_blocking=True)
            sample_seeds = seeds.index_select(0, index).to(self.device, non_blocking=True)
            keys = [store.keys[i] for i in order[b * batch_size:(b + 1) * batch_size]]
            yield Batch(augment_batch(images, sample_seeds, self.form), labels, keys, issues)
            issues = SampleIssues()

    def settle(self) -> None:
        """Wait until the background thread is idle (its result, or error, stays for the epoch that needs it)."""
        concurrent.futures.wait(list(self._ahead.values()))

    def close(self) -> None:
        _ORDERING.discard(self)
        self._pool.shutdown(wait=False, cancel_futures=True)


class CachedEval:
    """An evaluation split's share of this rank, from its :class:`Store`, in order, in batches; the
    samples the fill skipped or decoded with warnings come with the first batch of every pass."""

    def __init__(self, store: Store, *, batch_size: int, device: torch.device):
        self.store, self.batch_size, self.device = store, batch_size, device
        self.order = [i for i, key in enumerate(store.keys) if key]
        self._gather = _Gather(store, device)

    def __iter__(self) -> Iterator[Batch]:
        store, issues = self.store, self.store.issues
        order_dev = torch.tensor(self.order, dtype=torch.int64, device=store.images.device)
        for lo in range(0, len(self.order), self.batch_size):
            index = order_dev[lo:lo + self.batch_size]
            labels = store.labels.index_select(0, index).to(self.device, non_blocking=True)
            keys = [store.keys[i] for i in self.order[lo:lo + self.batch_size]]
            yield Batch(self._gather(index), labels, keys, issues)
            issues = SampleIssues()
        if issues:  # no sample to carry them: a rank whose share was all skipped
            yield Batch(torch.zeros(0, dtype=torch.uint8), torch.zeros(0), [], issues)
