"""What ``train``, ``eval`` and ``predict`` build alike from a config: the start-up shard check, the model,
the training batches and evaluation loaders (streamed, or from ``data.cache``)."""
from __future__ import annotations

import logging
import platform
from typing import Callable, Iterable

import torch
from accelerate import Accelerator

from celeba_dist import signals
from celeba_dist.config import Config, ConfigError
from celeba_dist.data.cache import (CacheMemoryError, CachedEval, CachedTrain, Store, cache_bytes, fill_store,
                                    fit_problem, part_size)
from celeba_dist.data.remote import ATTEMPTS
from celeba_dist.data.streams import (ShardCheckError, ShardData, ShardPart, TrainStream, deal_shards, eval_stream,
                                      make_loader, train_stream)
from celeba_dist.data.transforms import CachedForm, build_cached_form, build_transform
from celeba_dist.models import build_model
from celeba_dist.train.distributed import all_sum, gather_list, leave_process_group

log = logging.getLogger(__name__)


def check_data(cfg: Config, data: ShardData, accelerator: Accelerator, splits: tuple[str, ...]) -> None:
    """Every shard of ``splits`` exists with the manifest's size (``data.check_shards``), before any model is built.

    ``sha256`` also hashes them, each rank a share, and every rank raises the same error.
    """
    if cfg.data.check_shards == "none":
        return
    if data.remote:
        log.info("shards of %s are remote: each is checked as it is read (a missing or cut one ends the run "
                 "naming its URL after %d attempts)", data.root, ATTEMPTS)
        return
    problems = data.check_files(splits)
    if not problems and cfg.data.check_shards == "sha256":
        mine = data.check_files(splits, sha256=True, part=(accelerator.process_index, accelerator.num_processes))
        problems = gather_list(accelerator, mine)
    if problems:
        leave_process_group(accelerator)  # every rank is here with the same verdict: leave together
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ShardCheckError(f"{len(problems)} shard(s) of {data.root} ({', '.join(splits)}) do not match its "
                              f"manifest.json:\n  {shown}\nre-copy or re-pack them; `celeba-dist verify {data.root}` "
                              "checks every shard and sample")
    log.info("shards of %s (%s) checked against the manifest (%s)", data.root, ", ".join(splits), cfg.data.check_shards)


def refuse_empty_eval_splits(cfg: Config, data: ShardData, accelerator: Accelerator) -> None:
    """An evaluation split the shards hold no sample of fails the run before it trains, not at its first
    validation (a packing with ``--resplit 1,0,0``, or a source without a val split)."""
    empty = [s for s in cfg.train.eval_splits if not data.manifest["splits"].get(s, {}).get("num_samples")]
    if not empty:
        return
    leave_process_group(accelerator)  # every rank is here with the same verdict: leave together
    keep = [s for s in cfg.train.eval_splits if s not in empty]
    raise ConfigError(f"train.eval_splits: the shards in {data.root} hold no {' or '.join(empty)} samples (their "
                      f"manifest lists 0): leave {' and '.join(empty)} out, --set train.eval_splits=[{', '.join(keep)}]"
                      + ("; without val, each epoch's weights replace the last as the run's best" if "val" in empty
                         else ""))


def build_model_for(cfg: Config, num_attributes: int) -> torch.nn.Module:
    model = build_model(cfg.model.name, num_attributes=num_attributes, pretrained=cfg.model.pretrained,
                        **cfg.model.options)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def eval_loader(cfg: Config, data: ShardData, split: str, accelerator: Accelerator):
    transform = build_transform(cfg.data.transform, image_size=cfg.data.image_size, train=False)
    stream = eval_stream(data, split, transform, batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
                         rank=accelerator.process_index, world_size=accelerator.num_processes,
                         skip_bad=cfg.data.skip_bad_samples)
    return make_loader(stream, num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
                       timeout_s=cfg.data.loader_timeout_s)


class StoppedBeforeTraining(Exception):
    """A stop signal arrived before the first step (while the run started, or its cache filled); every
    rank agreed on ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def train_data(cfg: Config, data: ShardData, accelerator: Accelerator,
               stops: signals.StopRequests | None = None) -> TrainStream | CachedTrain:
    """The training batches: the shard stream, or with ``data.cache`` the rank's share decoded once
    (before the model is built, so a cache that cannot fit fails first) and replayed from memory.

    A fill cut short by a stop request (``stops``) raises :class:`StoppedBeforeTraining` on every rank
    (one collective after the fill): a preemption warning during a long fill still requeues the job."""
    stream = train_stream(
        data, build_transform(cfg.data.transform, image_size=cfg.data.image_size, train=True),
        batch_size=cfg.data.batch_size, rank=accelerator.process_index, world_size=accelerator.num_processes,
        num_workers=cfg.data.num_workers, seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
        subset=cfg.data.train_subset, skip_bad=cfg.data.skip_bad_samples)
    if cfg.data.cache == "none":
        return stream
    form = build_cached_form(cfg.data.transform, image_size=cfg.data.image_size, train=True)
    stops = stops or signals.StopRequests()
    store = cached_store(cfg, data, accelerator, stream.rank_parts(), form, what="train", stopped=stops.requested)
    stop_if_requested(accelerator, stops)
    return CachedTrain(stream, store, form, device=accelerator.device)


def stop_if_requested(accelerator: Accelerator, stops: signals.StopRequests) -> None:
    """Raise :class:`StoppedBeforeTraining` on every rank when any rank was asked to stop (one collective;
    SIGTERM on any rank wins over SIGUSR2, as in training)."""
    preempt, terminate = all_sum(accelerator, [float(stops.reason() == signals.PREEMPT),
                                               float(stops.reason() == signals.TERMINATE)])
    if preempt or terminate:
        reason = signals.TERMINATE if terminate else signals.PREEMPT
        stops.adopt(reason)
        raise StoppedBeforeTraining(reason)


def epoch_loader(cfg: Config, train: TrainStream | CachedTrain) -> Iterable:
    """What one epoch iterates (set ``train.epoch`` and ``train.skip_batches`` first)."""
    if isinstance(train, CachedTrain):
        return train
    return make_loader(train, num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
                       timeout_s=cfg.data.loader_timeout_s)


def cached_store(cfg: Config, data: ShardData, accelerator: Accelerator, parts: list[ShardPart], form: CachedForm,
                 *, what: str, stopped: Callable[[], bool] = lambda: False) -> Store:
    """Fill this rank's cache of ``parts``, once every rank knows that every rank's fits (collective)."""
    device = accelerator.device if cfg.data.cache == "device" else torch.device("cpu")
    needed = cache_bytes(sum(part_size(p) for p in parts), form, len(data.attributes))
    hosts = gather_list(accelerator, [platform.node()])
    problem = fit_problem(needed=needed, local_ranks=hosts.count(platform.node()), device=device,
                          what=f"data.cache={cfg.data.cache} {what}")
    problems = gather_list(accelerator, [f"rank {accelerator.process_index}: {problem}"] if problem else [])
    if problems:
        leave_process_group(accelerator)  # every rank is here with the same verdict: leave together
        raise CacheMemoryError("; ".join(problems[:3]) + (f" (and {len(problems) - 3} more ranks)"
                                                         if len(problems) > 3 else ""))
    return fill_store(parts, data.decoder(form.base, skip_bad=cfg.data.skip_bad_samples), size=form.size,
                      num_attributes=len(data.attributes), device=device, pin=torch.cuda.is_available(),
                      num_workers=cfg.data.num_workers, timeout_s=cfg.data.loader_timeout_s,
                      where=f"{what} (rank {accelerator.process_index})",
                      device_resample=form.resample if cfg.data.cache_decode == "device" else None, stopped=stopped)


def eval_batches(cfg: Config, data: ShardData, split: str, accelerator: Accelerator, caches: dict) -> Iterable:
    """An evaluation pass over this rank's share of ``split``: streamed, or with ``data.cache`` from a
    cache filled on the first pass and kept in ``caches``."""
    if cfg.data.cache == "none":
        return eval_loader(cfg, data, split, accelerator)
    if split not in caches:
        form = build_cached_form(cfg.data.transform, image_size=cfg.data.image_size, train=False)
        parts = deal_shards(data.split(split).shards, accelerator.num_processes, accelerator.process_index)
        caches[split] = CachedEval(cached_store(cfg, data, accelerator, parts, form, what=split),
                                   batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
                                   device=accelerator.device)
    return caches[split]
