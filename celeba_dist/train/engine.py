"""The steps: ``train_one_epoch`` and ``evaluate``. Everything else is composed in ``train.main``."""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from celeba_dist import signals
from celeba_dist.config import Config
from celeba_dist.data.streams import IssueTally
from celeba_dist.data.transforms import normalize_batch
from celeba_dist.train.board import Board
from celeba_dist.train.distributed import all_sum, gather_list, gather_rows
from celeba_dist.train.ema import WeightEMA
from celeba_dist.train.metrics import compute_metrics
from celeba_dist.runlock import RunLockedError

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops without checkpointing the bad weights."""


@dataclass
class TrainState:
    """Where training is. Saved in every checkpoint; the config never changes at run time."""

    epoch: int = 0
    global_step: int = 0  # optimizer steps
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained on
    best_metric: float | None = None
    best_epoch: int = -1
    best_step: int = -1
    best_weights: str = "raw"  # raw | ema: the weights the best epoch's validation chose (train.ema_decay)
    history: list[dict] = field(default_factory=list)  # one entry per finished epoch
    samples_seen: int = 0  # by this rank, over the whole run
    jpeg_warnings: int = 0  # training samples that decoded with a libjpeg warning, all ranks, whole run
    skipped_samples: int = 0  # training samples skipped as undecodable (data.skip_bad_samples), likewise
    world_size: int = 1
    batch_size: int = 0


@dataclass
class Trainer:
    """What the training steps need, built once by ``train.main``."""

    cfg: Config
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: torch.nn.Module
    board: Board
    steps_per_epoch: int  # micro-batches per epoch, the same on every rank
    total_steps: int  # optimizer steps of the whole run
    save: Callable[[TrainState], None]  # collective: every rank calls it at the same step
    stops: signals.StopRequests = field(default_factory=signals.StopRequests)  # this run's, from its signal handlers
    lost_lock: threading.Event = field(default_factory=threading.Event)  # set when another process took the folder
    eval_caches: dict = field(default_factory=dict)  # data.cache: split -> its CachedEval, filled at first use
    ema: WeightEMA | None = None  # train.ema_decay: the average of the weights, updated after every optimizer step


def prepare_batch(images: torch.Tensor, labels: torch.Tensor, *, device: torch.device, normalize: str,
                  channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, H, W) on the host → normalised float on the device."""
    x = normalize_batch(images.to(device, non_blocking=True), normalize)
    # the loader's batches come channel-last (one copy cheaper to stack); the model gets the layout it asked for
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return x, labels.to(device, non_blocking=True)


class _Meter:
    """Losses and timing since the last check, kept on the device: one copy kernel per step, no sync."""

    def __init__(self, device: torch.device, capacity: int):
        self.losses = torch.zeros(capacity, device=device)
        self.first_step = 0  # global step of losses[0]
        self.count = self.images = 0
        self.wait = 0.0
        self.start = time.perf_counter()
        self.warned = self.skipped = 0  # data issues since the last _agree (which zeroes them)

    def add(self, loss: torch.Tensor, step: int) -> None:
        if self.count == 0:
            self.first_step = step
        self.losses[self.count] = loss.detach()
        self.count += 1

    def reset(self) -> None:
        self.count = self.images = 0
        self.wait = 0.0
        self.start = time.perf_counter()

    def summary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the losses, index of the first non-finite one or -1), still on the device."""
        window = self.losses[: self.count]
        if self.count == 0:
            return window.double().sum(), torch.tensor(-1)
        bad = ~torch.isfinite(window)
        first = torch.where(bad.any(), bad.int().argmax(), torch.tensor(-1, device=window.device))
        return window.double().sum(), first


def _agree(trainer: Trainer, meter: _Meter, state: TrainState) -> tuple[float, str | None]:
    """One collective: mean loss since the last check, and whether any rank was asked to stop and why.

    The stop reason is agreed too (SIGTERM on any rank wins over SIGUSR2), so every rank returns
    the same status; the data issues of all ranks are added to ``state``'s run totals. Raises
    :class:`NonFiniteLossError` (on every rank) naming the first bad step.
    """
    total, first = meter.summary()
    first_bad = int(first)
    reason = trainer.stops.reason()
    loss_sum, count, bad, preempt, terminate, warned, skipped, lost = all_sum(trainer.accelerator, [
        float(total) if first_bad < 0 else 0.0, meter.count, float(first_bad >= 0),
        float(reason == signals.PREEMPT), float(reason == signals.TERMINATE), meter.warned, meter.skipped,
        float(trainer.lost_lock.is_set())])
    if lost:
        raise RunLockedError(f"another process took the lock of {trainer.cfg.run_dir} over (see the error logged "
                             "then): this run stops at this step, without a checkpoint")
    state.jpeg_warnings += int(warned)
    state.skipped_samples += int(skipped)
    meter.warned = meter.skipped = 0
    if bad:
        steps = gather_list(trainer.accelerator, [meter.first_step + first_bad if first_bad >= 0 else -1])
        step = min(s for s in steps if s >= 0)
        raise NonFiniteLossError(f"non-finite loss at optimizer step {step}; stopping without saving these "
                                 f"weights (the last good checkpoint stays in {trainer.cfg.run_dir / 'checkpoints'})")
    agreed = signals.TERMINATE if terminate else signals.PREEMPT if preempt else None
    if agreed:
        trainer.stops.adopt(agreed)
    return loss_sum / max(count, 1), agreed


def _log_step(trainer: Trainer, state: TrainState, meter: _Meter, mean_loss: float, bar: tqdm) -> None:
    elapsed = max(time.perf_counter() - meter.start, 1e-9)
    world = trainer.accelerator.num_processes
    values = {
        "train/loss": mean_loss,
        "train/lr": trainer.optimizer.param_groups[0]["lr"],
        "train/images_per_s": meter.images * world / elapsed,
        "train/data_wait_fraction": meter.wait / elapsed,
        "train/epoch": state.epoch + state.batch_in_epoch / trainer.steps_per_epoch,
        "data/jpeg_warnings": state.jpeg_warnings,
        "data/skipped_samples": state.skipped_samples,
    }
    if torch.cuda.is_available():
        values["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    trainer.board.scalars(values, state.global_step)
    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{values['train/lr']:.2e}", img_s=f"{values['train/images_per_s']:.0f}")


def train_one_epoch(trainer: Trainer, loader: Iterable, state: TrainState) -> str:
    """Train until the epoch's quota of batches is done; returns "done", "stopped" or "max_steps".

    Gradient accumulation groups ``grad_accum_steps`` micro-batches (the last group of an epoch
    may be shorter); gradients are synchronised only on a group's last micro-batch. Checkpoints,
    stop requests and loss checks happen only at optimizer-step boundaries.
    """
    cfg, acc = trainer.cfg, trainer.accelerator
    trainer.model.train()
    meter = _Meter(acc.device, capacity=cfg.train.log_every_steps)  # reset at every log line
    bar = tqdm(total=trainer.steps_per_epoch, initial=state.batch_in_epoch, desc=f"epoch {state.epoch}", dynamic_ncols=True,
               disable=not (acc.is_main_process and cfg.log.progress_bar), leave=False)
    tally = IssueTally(f"epoch {state.epoch}, rank {acc.process_index}")
    try:
        return _train_batches(trainer, loader, state, meter, tally, bar)
    finally:
        bar.close()
        tally.log_summary()


def _train_batches(trainer: Trainer, loader: Iterable, state: TrainState, meter: _Meter, tally: IssueTally,
                   bar: tqdm) -> str:
    cfg, acc, model = trainer.cfg, trainer.accelerator, trainer.model
    accum, n = cfg.train.grad_accum_steps, trainer.steps_per_epoch
    fetched = time.perf_counter()
    for images, labels, _, issues in loader:
        meter.wait += time.perf_counter() - fetched
        tally.add(issues)
        meter.warned += len(issues.warned)
        meter.skipped += len(issues.skipped)
        group_start = state.batch_in_epoch - state.batch_in_epoch % accum
        group_size = min(accum, n - group_start)
        sync = state.batch_in_epoch + 1 == group_start + group_size
        x, y = prepare_batch(images, labels, device=acc.device, normalize=cfg.data.normalize,
                             channels_last=cfg.train.channels_last)
        with contextlib.nullcontext() if sync else acc.no_sync(model):
            out = model(x)  # accelerator.prepare() made forward run under autocast and return float32
            loss = trainer.loss_fn(out, y)  # (B, A) logits → scalar
            acc.backward(loss / group_size if group_size > 1 else loss)
        state.batch_in_epoch += 1
        state.samples_seen += y.shape[0]
        meter.images += y.shape[0]
        bar.update(1)
        if sync:
            status = _optimizer_step(trainer, state, meter, loss, bar)
            if status != "continue":
                return status
        fetched = time.perf_counter()
    if state.batch_in_epoch != n:
        raise RuntimeError(f"epoch {state.epoch}: the loader gave {state.batch_in_epoch} batches, expected {n}")
    _agree(trainer, meter, state)  # a last loss check before the epoch-end checkpoint
    return "done"


def _optimizer_step(trainer: Trainer, state: TrainState, meter: _Meter, loss: torch.Tensor, bar: tqdm) -> str:
    cfg, acc = trainer.cfg, trainer.accelerator
    if cfg.train.clip_grad_norm > 0:
        acc.clip_grad_norm_(trainer.model.parameters(), cfg.train.clip_grad_norm)
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.ema is not None:
        trainer.ema.update(acc.unwrap_model(trainer.model, keep_torch_compile=False))
    state.global_step += 1
    meter.add(loss, state.global_step)
    step = state.global_step
    every = cfg.train.checkpoint_every_steps
    save_due = every > 0 and step % every == 0 and state.batch_in_epoch < trainer.steps_per_epoch
    last = cfg.train.max_steps > 0 and step >= cfg.train.max_steps
    if step % cfg.train.log_every_steps == 0 or step % cfg.train.sync_every_steps == 0 or save_due or last:
        mean_loss, stop = _agree(trainer, meter, state)
        if step % cfg.train.log_every_steps == 0:
            _log_step(trainer, state, meter, mean_loss, bar)
            meter.reset()
        if stop:
            log.warning("stop requested by %s (%s): checkpointing at step %d",
                        signals.signal_names(trainer.stops.received) or "another rank", stop, step)
            trainer.save(state)
            return "stopped"
        if save_due:
            trainer.save(state)
    return "max_steps" if last else "continue"


@dataclass
class Predictions:
    probs: torch.Tensor  # (N, A) scores in [0, 1]
    targets: torch.Tensor  # (N, A) 0/1
    keys: list[str]
    skipped: list[str] = field(default_factory=list)  # samples skipped as undecodable (data.skip_bad_samples)
    warned: list[str] = field(default_factory=list)  # samples that decoded with a libjpeg warning


@torch.no_grad()
def evaluate(trainer_model: torch.nn.Module, loader: Iterable, *, accelerator: Accelerator, cfg: Config,
             to_prob: Callable[[torch.Tensor], torch.Tensor], expected: int, split: str,
             num_attributes: int) -> Predictions:
    """Scores of every sample of a split, gathered from all ranks, each sample exactly once.

    Raises if the samples seen across ranks (evaluated, or skipped as undecodable) are not exactly
    the manifest's (a duplicate or a drop would bias every metric silently).
    """
    model = accelerator.unwrap_model(trainer_model)
    was_training = model.training
    model.eval()
    probs, targets, keys = [], [], []
    tally = IssueTally(f"{split}, rank {accelerator.process_index}")
    for images, labels, batch_keys, issues in loader:
        tally.add(issues)
        if not batch_keys:
            continue
        x, y = prepare_batch(images, labels, device=accelerator.device, normalize=cfg.data.normalize,
                             channels_last=cfg.train.channels_last)
        with accelerator.autocast():
            probs.append(predict_probs(model, x, to_prob, tta=cfg.eval.tta).cpu())
        targets.append(y.cpu())
        keys.extend(batch_keys)
    model.train(was_training)
    local_p = torch.cat(probs) if probs else torch.zeros(0, num_attributes)  # a rank may get no shard
    local_t = torch.cat(targets) if targets else torch.zeros(0, num_attributes)
    all_p, all_t = gather_rows(accelerator, local_p), gather_rows(accelerator, local_t)
    all_keys = gather_list(accelerator, keys)
    skipped, warned = gather_list(accelerator, tally.skipped), gather_list(accelerator, tally.warned)
    tally.log_summary()
    seen = len(all_keys) + len(skipped)
    if seen != expected or len(set(all_keys) | set(skipped)) != expected:
        raise RuntimeError(f"evaluation on {split} saw {seen} samples ({len(set(all_keys) | set(skipped))} distinct, "
                           f"{len(skipped)} of them skipped) across {accelerator.num_processes} processes; "
                           f"the manifest has {expected}")
    return Predictions(all_p, all_t, all_keys, skipped, warned)


def predict_probs(model: torch.nn.Module, x: torch.Tensor, to_prob: Callable[[torch.Tensor], torch.Tensor], *,
                  tta: str = "none") -> torch.Tensor:
    """Probabilities (B, A) of a normalised batch; ``tta="flip"`` (``eval.tta``) averages them with the
    probabilities of the horizontally mirrored batch."""
    probs = to_prob(model(x).float())
    if tta == "flip":
        probs = (probs + to_prob(model(x.flip(3)).float())) / 2
    elif tta != "none":
        raise ValueError(f"unknown eval.tta {tta!r}; valid: ['none', 'flip']")
    return probs


def split_metrics(preds: Predictions, attributes: list[str], thresholds: list[float] | None) -> dict:
    """The metrics.json block of one split (see :func:`celeba_dist.metrics.compute_metrics`), with the
    samples that were skipped or decoded with warnings counted (and the first ones named)."""
    metrics = compute_metrics(preds.probs, preds.targets, attributes, torch.tensor(thresholds) if thresholds else 0.5)
    metrics["data_issues"] = {"skipped_samples": len(preds.skipped), "jpeg_warnings": len(preds.warned),
                              "skipped": sorted(preds.skipped)[:100], "warned": sorted(preds.warned)[:100]}
    return metrics


def supports_attention(model: torch.nn.Module) -> bool:
    return "return_attention" in inspect.signature(model.forward).parameters

