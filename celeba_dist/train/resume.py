"""The checkpoint protocol of a run: a collective save (every rank's RNG state, rank 0 writes,
non-finite weights refused) and the resume that restores it, exactly or at the nearest position when
the world or batch size changed. The file format itself is :mod:`celeba_dist.train.checkpoint`."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from celeba_dist.config import Config, ConfigError
from celeba_dist.train.checkpoint import (BEST, atomic_save, link_best, list_checkpoints, load_checkpoint,
                                          load_newest_valid, newest_intact, prune, rng_state, set_rng_state,
                                          step_path)
from celeba_dist.train.distributed import gather_list
from celeba_dist.train.ema import RAW, WeightEMA
from celeba_dist.train.engine import NonFiniteLossError, TrainState

log = logging.getLogger(__name__)


def make_saver(cfg: Config, accelerator: Accelerator, model, optimizer, scheduler, attributes: list[str], *,
               ema: WeightEMA | None = None):
    """A collective save: every rank contributes its RNG state, rank 0 writes the file. With ``ema`` the
    average is saved too, and ``weights`` (raw | ema) says which of the two this checkpoint's evaluation uses."""
    ckpt_dir = cfg.run_dir / "checkpoints"

    def save(state: TrainState, *, best: bool = False, thresholds: list[float] | None = None,
             weights: str = RAW) -> Path:
        # DDP keeps the weights identical on every rank, so every rank reaches the same verdict.
        bad = [n for n, p in accelerator.unwrap_model(model).named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(f"non-finite weights at optimizer step {state.global_step} (the loss was finite): "
                                     f"weights {bad[:3]} are not finite; not checkpointed (the last good "
                                     f"checkpoint stays in {ckpt_dir})")
        rngs = gather_list(accelerator, [rng_state()])
        seen = gather_list(accelerator, [state.samples_seen])
        path = step_path(ckpt_dir, state.global_step)
        if accelerator.is_main_process:
            scaler = accelerator.scaler
            atomic_save({
                "model": accelerator.unwrap_model(model, keep_torch_compile=False).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rngs,
                "samples_seen": seen,
                "state": dataclasses.asdict(state),
                "config": cfg.to_dict(),
                "attributes": attributes,
                "thresholds": thresholds,
                "weights": weights,
                **(ema.state_dict() if ema is not None else {"ema": None}),
            }, path)
            if best:
                link_best(ckpt_dir, path)
            prune(ckpt_dir, cfg.train.keep_last)
            log.info("checkpoint %s (epoch %d, step %d)%s", path.name, state.epoch, state.global_step,
                     f" = best ({weights} weights)" if best else "")
        accelerator.wait_for_everyone()
        return path

    return save


def refuse_fresh_start_over_checkpoints(cfg: Config) -> None:
    """``run.resume=none`` in a folder that holds checkpoints would mix two runs: their checkpoints
    (pruning would keep the old run's higher steps), their TensorBoard steps and a later auto-resume."""
    if cfg.run.resume == "none" and (found := list_checkpoints(cfg.run_dir / "checkpoints")):
        raise ConfigError(f"run.resume=none: {cfg.run_dir} already holds checkpoints of a run (newest "
                          f"{found[0].name}); train from scratch in a new --run-dir, or remove "
                          f"{cfg.run_dir / 'checkpoints'} first")


def adopt_best(ckpt_dir: Path, resumed_from: Path) -> None:
    """A run continued from another folder's checkpoint takes that run's best.pt along (or, without
    one, the checkpoint itself): the best epoch so far may lie before the resume."""
    if (ckpt_dir / BEST).exists() or resumed_from.parent.resolve() == ckpt_dir.resolve():
        return
    source = resumed_from.parent / BEST if (resumed_from.parent / BEST).is_file() else resumed_from
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    link_best(ckpt_dir, source)
    log.info("best checkpoint so far: %s, taken into %s", source, ckpt_dir)


def reconcile_best(ckpt_dir: Path, state: TrainState, *, write: bool) -> None:
    """Make best.pt agree with the run's record of its best step. best.pt is linked only after the
    checkpoint it points at is written, so a kill between the two (or a best.pt deleted by hand) leaves
    it behind: point it at that step's checkpoint again (rank 0, ``write``). Where that checkpoint was
    pruned as well, the best so far is gone: forget it, on every rank, so the next validation sets one."""
    if state.best_step < 0:
        return
    best, source = ckpt_dir / BEST, step_path(ckpt_dir, state.best_step)
    if source.is_file():
        if write and not (best.is_file() and os.path.samefile(best, source)):
            link_best(ckpt_dir, source)
            log.warning("best.pt did not point at the run's best checkpoint %s (a stop between writing it and "
                        "linking best.pt?): linked it again", source.name)
        return
    if not best.is_file():
        log.warning("best.pt is missing and the best epoch's checkpoint (step %d) was pruned: the best weights so "
                    "far are lost; the next validation chooses a new best", state.best_step)
        state.best_metric, state.best_epoch, state.best_step = None, -1, -1


def checkpoint_to_resume(cfg: Config, *, mmap: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """(path, checkpoint) a run continues from: the newest valid one of its folder (``run.resume=auto``)
    or the file ``run.resume`` names; None for a fresh start. ``mmap``: the tensors stay mapped from the
    file (a check that reads the configuration only)."""
    if cfg.run.resume == "none":
        return None
    if cfg.run.resume == "auto":
        return load_newest_valid(cfg.run_dir / "checkpoints", mmap=mmap)
    path = Path(cfg.run.resume)
    return path, load_checkpoint(path, mmap=mmap)


# What a resume takes from the checkpoint, whatever the configuration says now: the architecture, and the
# optimizer's and the schedule's state, hyperparameters included. A change to these would be ignored
# (the learning rate) or fail half-way with a dump of state-dict keys (the model).
KEPT_ON_RESUME = ("model.name", "model.options", "data.image_size", "optim", "sched")


def refuse_changed_run(cfg: Config, found: tuple[Path, dict[str, Any]], data_now: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` when the run would continue ``found`` with settings its checkpoint
    overrides, other attributes, or other shards, naming each difference; nothing is written before."""
    path, ckpt = found
    old, new = _kept_settings(ckpt["config"]), _kept_settings(cfg.to_dict())
    changed = [f"{key}: {old[key]!r} in the checkpoint, {new[key]!r} now"
               for key in sorted(old.keys() & new.keys()) if old[key] != new[key]]  # keys of both versions
    if ckpt.get("attributes") is not None and list(ckpt["attributes"]) != list(data_now["attributes"]):
        changed.append(f"the attributes: {_few(ckpt['attributes'])} in the checkpoint, {_few(data_now['attributes'])} "
                       "now (data.attributes)")
    data_then = _data_summary_of(path)
    for key in ("shards_sha256", "manifest_sha256"):  # the content-only fingerprint first (older runs lack it)
        if data_then.get(key) and data_now.get(key):
            if data_then[key] != data_now[key]:
                changed.append(f"the shards: {data_now['root']} holds other samples than {data_then.get('root')}, "
                               f"which the checkpoint trained on ({key} differs)")
            break
    if changed:
        raise ConfigError(f"{path} cannot be resumed with these settings, which the checkpoint's own would "
                          "override or break: " + "; ".join(changed) + ". Put them back, or train a new run in "
                          f"another --run-dir (model.pretrained={path} starts one from these weights)")


def _few(names: list[str]) -> str:
    """``[Male]``, or the count and the first names of a long list."""
    return f"[{', '.join(names)}]" if len(names) <= 4 else f"{len(names)} [{', '.join(names[:3])}, ...]"


def _kept_settings(config: dict[str, Any]) -> dict[str, Any]:
    """``section.key`` → value of a config's dict, for the keys of :data:`KEPT_ON_RESUME`."""
    out = {}
    for section, values in config.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if section in KEPT_ON_RESUME or name in KEPT_ON_RESUME:
                out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _data_summary_of(checkpoint: Path) -> dict[str, Any]:
    """The data.json of the run folder a checkpoint lies in (``RUN/checkpoints/step-*.pt``), or {}."""
    try:
        return json.loads((checkpoint.parent.parent / "data.json").read_text())
    except (OSError, ValueError):
        return {}


def resume(cfg: Config, accelerator: Accelerator, model, optimizer, scheduler,
           found: tuple[Path, dict[str, Any]] | None, *, ema: WeightEMA | None = None) -> tuple[TrainState, Any]:
    """Restore ``found`` (:func:`checkpoint_to_resume`; with ``ema``, its average of the weights too), or
    return a fresh state."""
    fresh = TrainState(world_size=accelerator.num_processes, batch_size=cfg.data.batch_size)
    if found is None:
        return fresh, None
    path, ckpt = found
    if cfg.run.resume != "auto" and accelerator.is_main_process:
        adopt_best(cfg.run_dir / "checkpoints", path)
    accelerator.unwrap_model(model, keep_torch_compile=False).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ema is not None:
        ema.load_state_dict(ckpt)
    if ckpt.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(ckpt["scaler"])
    state = TrainState(**ckpt["state"])
    rank, world = accelerator.process_index, accelerator.num_processes
    if len(ckpt["rng"]) == world and state.batch_size == cfg.data.batch_size:
        set_rng_state(ckpt["rng"][rank])
        state.samples_seen = ckpt["samples_seen"][rank]
    else:  # a different world or batch size: same epoch, nearest equivalent position
        old_global = state.world_size * state.batch_size
        state.batch_in_epoch = state.batch_in_epoch * old_global // (world * cfg.data.batch_size)
        log.warning("resuming a run saved with %d processes × batch %d on %d × %d: RNG states reseeded, "
                    "epoch %d continues at batch %d", state.world_size, state.batch_size, world,
                    cfg.data.batch_size, state.epoch, state.batch_in_epoch)
        state.samples_seen = 0
    state.world_size, state.batch_size = world, cfg.data.batch_size
    reconcile_best(cfg.run_dir / "checkpoints", state, write=accelerator.is_main_process)
    log.info("resumed from %s: epoch %d, batch %d of the epoch, step %d", path, state.epoch,
             state.batch_in_epoch, state.global_step)
    return state, ckpt


def resume_hint(ckpt_dir: Path, *, fix: str = "free space and ") -> str:
    """What a user does next after a failure that ``fix`` mends: run the same command again."""
    newest = newest_intact(ckpt_dir)
    if newest is None:
        return f"no checkpoint was written yet: {fix}run the same command to start again"
    return f"the newest intact checkpoint is {newest}: {fix}run the same command to resume from it"
