"""``main(config)``: compose the run from ``build_*`` helpers, then epochs of train → validate → checkpoint.

The same ``main`` serves every launcher: a plain process, ``accelerate launch``, ``torchrun`` and
the SLURM tasks of ``celeba_dist.launch``. ``python -m celeba_dist.train`` and
``celeba-dist train`` take ``--config NAME_OR_FILE --data SHARDS --run-dir DIR [--set k=v ...]``.
"""
from __future__ import annotations

import dataclasses
import argparse
import hashlib
import importlib.metadata
import logging
import math
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from celeba_dist import __version__, runlock, signals
from celeba_dist.cli_args import report_error
from celeba_dist.config import Config, ConfigError, add_config_arguments, config_from_args, save_config
from celeba_dist.data.cache import CacheMemoryError, CachedTrain
from celeba_dist.data.streams import DataError, ShardData, eval_stream, owned_workers
from celeba_dist.data.transforms import build_transform
from celeba_dist.diskio import DiskFullError, write_json
from celeba_dist.logs import attach_log_file, setup_logging
from celeba_dist.shards.manifest import ManifestError, shards_fingerprint
from celeba_dist.train.board import Board, accuracy_bars, attention_overlay, prediction_grid
from celeba_dist.train.build import (StoppedBeforeTraining, build_model_for, check_data, epoch_loader,
                                     eval_batches, refuse_empty_eval_splits, stop_if_requested, train_data)
from celeba_dist.train.checkpoint import (BEST, UnsafeCheckpointError, load_checkpoint, newest_intact,
                                          remove_partial_saves, step_of)
from celeba_dist.train.distributed import build_accelerator, from_main, leave_process_group
from celeba_dist.train.engine import (NonFiniteLossError, Predictions, TrainState, Trainer, evaluate, prepare_batch,
                                      split_metrics, supports_attention, train_one_epoch)
from celeba_dist.train.losses import LOSSES, build_loss, positive_weights
from celeba_dist.train.ema import EMA, RAW, build_ema, selected_weights
from celeba_dist.train.metrics import format_table, tuned_thresholds, write_attribute_csv
from celeba_dist.train.optim import build_optimizer, build_scheduler
from celeba_dist.train.resume import (checkpoint_to_resume, make_saver, refuse_changed_run,
                                      refuse_fresh_start_over_checkpoints, resume, resume_hint)

log = logging.getLogger("celeba_dist.train.main")  # not __name__: this module also runs as __main__
# Exit status of a run stopped by SIGTERM/SIGUSR2/SIGINT after checkpointing (sysexits' EX_TEMPFAIL):
# nothing is lost, run the same command again to continue.
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
# main's status for each stop reason of celeba_dist.signals: SIGUSR2 asks for a requeue, SIGTERM does not.
STOPPED = {signals.PREEMPT: "preempted", signals.TERMINATE: "terminated"}


# ---------------------------------------------------------------------------------------------
# Builders


def seed_everything(cfg: Config) -> None:
    """Per-rank seeds (dropout differs across ranks; DDP broadcasts rank 0's initial weights)."""
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    set_seed(cfg.train.seed, device_specific=True)


def lock_run_dir(cfg: Config, accelerator: Accelerator) -> runlock.RunLock | None:
    """Rank 0 locks the run folder before anything is written into it; every rank learns the outcome,
    so all ranks of a second run on the folder raise the same error and none of them writes."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = runlock.acquire(cfg.run_dir, stale_s=cfg.run.lock_stale_s)
        except (runlock.RunLockedError, OSError) as exc:
            error = exc
    error = from_main(accelerator, error)
    if error is not None:
        leave_process_group(accelerator)  # every rank is here: leave together (see distributed.py)
        raise error
    return lock


def build_run_dir(cfg: Config, accelerator: Accelerator, data: ShardData) -> Path:
    run_dir = cfg.run_dir
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        write_json(run_dir / "env.json", environment(accelerator))
        write_json(run_dir / "data.json", data_summary(data))
    accelerator.wait_for_everyone()
    return run_dir


def data_summary(data: ShardData) -> dict[str, Any]:
    """What the run trained on, for the model card of an export (which never needs the shards)."""
    return {"root": str(data.root), "source": data.manifest.get("source"), "attributes": data.attributes,
            "splits": {name: split["num_samples"] for name, split in data.manifest["splits"].items()},
            "manifest_sha256": data.manifest_sha256, "shards_sha256": shards_fingerprint(data.manifest)}


def check_resumable(cfg: Config) -> None:
    """Refuse what the run would refuse before its first step because of the checkpoint it continues (the
    checks of ``_train``, in its order: the shards are read only for a checkpoint to compare them with).
    ``submit`` and ``sweep`` call this on the login node, so a refused resume does not wait in the queue first;
    the checkpoint's tensors stay mapped, unread (a ResNeXt-50's optimizer state is hundreds of MB on NFS)."""
    refuse_fresh_start_over_checkpoints(cfg)
    found = checkpoint_to_resume(cfg, mmap=True)
    if found is not None:
        refuse_changed_run(cfg, found, data_summary(ShardData(cfg.data.root, cfg.data.attributes)))


def environment(accelerator: Accelerator) -> dict[str, Any]:
    """Versions, world and devices, git commit: what someone needs to reproduce the run."""
    import accelerate
    import webdataset

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "celeba_dist": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "torchvision": importlib.metadata.version("torchvision"), "accelerate": accelerate.__version__,
        "webdataset": webdataset.__version__, "platform": platform.platform(), "host": platform.node(),
        "world_size": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
        "device": str(accelerator.device),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "mixed_precision": accelerator.mixed_precision, "git_commit": commit,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------------------------------------
# Evaluation and reporting


def validate(trainer: Trainer, data: ShardData, split: str, state: TrainState, *,
             thresholds: list[float] | None = None, log_scalars: bool = True, weights: str = RAW
             ) -> tuple[dict, Predictions]:
    """Metrics of ``split`` with the trained weights, or (``weights="ema"``) their average; logged as
    ``<split>/...`` or ``<split>_ema/...``."""
    cfg, acc = trainer.cfg, trainer.accelerator
    model = trainer.ema.module if weights == EMA else trainer.model
    preds = evaluate(model, eval_batches(cfg, data, split, acc, trainer.eval_caches), accelerator=acc, cfg=cfg,
                     to_prob=LOSSES[cfg.loss.name].to_prob, expected=data.split(split).num_samples, split=split,
                     num_attributes=len(data.attributes))
    metrics = split_metrics(preds, data.attributes, thresholds)
    if log_scalars:
        trainer.board.split_metrics(split if weights == RAW else f"{split}_ema", metrics, state.global_step)
    return metrics, preds


def draw_validation(trainer: Trainer, data: ShardData, metrics: dict, step: int, *,
                    thresholds: list[float] | None = None, weights: str = RAW) -> None:
    """Rank 0 only: a labelled image grid, the attention heat map and the accuracy bars."""
    cfg, acc = trainer.cfg, trainer.accelerator
    if not acc.is_main_process or cfg.log.image_grid_size <= 0:
        return
    trainer.board.image("val/attribute_accuracy", accuracy_bars(metrics), step)
    transform = build_transform(cfg.data.transform, image_size=cfg.data.image_size, train=False)
    stream = eval_stream(data, "val", transform, batch_size=cfg.log.image_grid_size, rank=0, world_size=1)
    images, labels, *_ = next(iter(stream))
    model = trainer.ema.module if weights == EMA else acc.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()
    x, _ = prepare_batch(images, labels, device=acc.device, normalize=cfg.data.normalize,
                         channels_last=cfg.train.channels_last)
    with torch.no_grad(), acc.autocast():
        if supports_attention(model):
            out, attn = model(x, return_attention=True)
            trainer.board.image("val/attention", attention_overlay(images, attn.float().cpu()), step)
        else:
            out = model(x)
    model.train(was_training)
    probs = LOSSES[cfg.loss.name].to_prob(out.float()).cpu()
    trainer.board.image("val/predictions", prediction_grid(images, probs, labels, data.attributes,
                                                                  thresholds=thresholds), step)


def select_value(metrics: dict, name: str) -> float:
    value = metrics["mean"].get(name)
    if value is None:
        raise KeyError(f"train.select_metric={name!r} is not a mean metric; valid: {sorted(metrics['mean'])}")
    return value


def write_results(run_dir: Path, results: dict[str, dict], state: TrainState, thresholds: list[float] | None,
                  attributes: list[str]) -> None:
    out = {**results, "best_epoch": state.best_epoch, "best_step": state.best_step,
           "select_metric_value": state.best_metric, "weights": state.best_weights, "history": state.history,
           "thresholds": dict(zip(attributes, thresholds)) if thresholds else None}
    write_json(run_dir / "metrics.json", out)
    write_attribute_csv(results, run_dir / "metrics_per_attribute.csv")


# ---------------------------------------------------------------------------------------------
# main


def main(cfg: Config, *, on_locked: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train ``cfg`` on every rank; returns {"status", "run_dir", "global_step", "best", "metrics"}.

    The run folder is locked for the whole run (:mod:`celeba_dist.runlock`): a second run on it
    raises :class:`runlock.RunLockedError` before it writes anything (``on_locked``, called on the main
    process once the lock is held, is not called then); a run whose lock another process took over
    stops at its next step check with the same error, on every rank, writing nothing more.
    """
    # SIGTERM/SIGUSR2/SIGINT/SIGHUP are this run's stop requests from its first moment: a scancel in the
    # first seconds of a job (submitit's own handler would ignore it) ends it as cleanly as a later one.
    with signals.stop_requests(signals.RUN_SIGNALS) as stops:
        return _locked_run(cfg, stops, on_locked)


def _locked_run(cfg: Config, stops: signals.StopRequests, on_locked: Callable[[], None] | None) -> dict[str, Any]:
    accelerator = build_accelerator(precision=cfg.train.precision,
                                    collective_timeout_min=cfg.train.collective_timeout_min)
    setup_logging(rank=accelerator.process_index, is_main=accelerator.is_main_process, pending_file=True)
    data = ShardData(cfg.data.root, cfg.data.attributes)
    refuse_empty_eval_splits(cfg, data, accelerator)
    check_data(cfg, data, accelerator, ("train", *cfg.train.eval_splits))
    lock = lock_run_dir(cfg, accelerator)
    try:
        attach_log_file(cfg.run_dir / "logs", rank=accelerator.process_index)
        if on_locked is not None and accelerator.is_main_process:
            on_locked()
        result = _train(cfg, accelerator, data, stops, lost_lock=lock.lost if lock is not None else None)
    except DiskFullError as exc:
        raise exc.with_detail(resume_hint(cfg.run_dir / "checkpoints")) from exc
    finally:
        if lock is not None:
            lock.release()
    if lock is not None and lock.lost.is_set():
        raise runlock.RunLockedError(f"another process took the lock of {cfg.run_dir} over during this run: "
                                     f"its files may be mixed with this run's (see the error logged then)")
    return result


def _train(cfg: Config, accelerator: Accelerator, data: ShardData, stops: signals.StopRequests, *,
           lost_lock: threading.Event | None = None) -> dict[str, Any]:
    """The run itself, with the run folder locked and the shards checked. A stop requested before the
    first step (every rank agrees on it: after the lock, and after a cache fill) ends it there."""
    found = None
    try:
        stop_if_requested(accelerator, stops)  # a scancel while the job started: release the folder at once
        refuse_fresh_start_over_checkpoints(cfg)
        found = checkpoint_to_resume(cfg)
        if found is not None:  # before anything is written: the run folder keeps describing its checkpoints
            refuse_changed_run(cfg, found, data_summary(data))
        run_dir = build_run_dir(cfg, accelerator, data)
        if accelerator.is_main_process:
            remove_partial_saves(run_dir / "checkpoints")
        seed_everything(cfg)
        train_ds = train_data(cfg, data, accelerator, stops)
    except StoppedBeforeTraining as stop:
        return _stopped_before_training(cfg, accelerator, stops, stop.reason, found)
    model = build_model_for(cfg, len(data.attributes))
    steps_per_epoch = train_ds.steps_per_epoch
    optimizer_steps = math.ceil(steps_per_epoch / cfg.train.grad_accum_steps)
    total_steps = optimizer_steps * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    optimizer = build_optimizer(model.parameters(), **dataclasses.asdict(cfg.optim))
    scheduler = build_scheduler(optimizer, **dataclasses.asdict(cfg.sched), steps_per_epoch=optimizer_steps,
                                total_steps=total_steps)
    pos_weight = positive_weights(data.positive_rates("train")) if cfg.loss.pos_weight else None
    loss_fn = build_loss(cfg.loss.name, pos_weight=pos_weight).to(accelerator.device)
    if cfg.train.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = build_ema(accelerator.unwrap_model(model, keep_torch_compile=False), cfg.train.ema_decay)
    state, ckpt = resume(cfg, accelerator, model, optimizer, scheduler, found, ema=ema)
    # A resumed run drops events logged after its checkpoint's step (they will be logged again).
    board = Board(run_dir, enabled=accelerator.is_main_process, purge_step=state.global_step + 1 if ckpt else None)
    save = make_saver(cfg, accelerator, model, optimizer, scheduler, data.attributes, ema=ema)
    log.info("run %s: %s on %d process(es), %d attributes, %d batches/epoch/process, %d optimizer steps",
             run_dir, cfg.model.name, accelerator.num_processes, len(data.attributes), steps_per_epoch, total_steps)
    trained, failed = None, True
    try:
        with owned_workers():  # an error anywhere ends this rank's loader workers too
            trainer = Trainer(cfg, accelerator, model, optimizer, scheduler, loss_fn, board, steps_per_epoch,
                              total_steps, save, stops, lost_lock or threading.Event(), ema=ema)
            status = _fit(trainer, data, train_ds, state)
            trained = param_checksum(accelerator.unwrap_model(model, keep_torch_compile=False))  # before best.pt's load
            results = {} if status == "stopped" else _final_test(trainer, data, state)
        failed = False
    finally:
        if isinstance(train_ds, CachedTrain):
            train_ds.close()
        checksum = trained or param_checksum(accelerator.unwrap_model(model, keep_torch_compile=False))
        _close_run(board, run_dir, accelerator.process_index, state, checksum, failed=failed)
    leave_process_group(accelerator)
    return _result(STOPPED[stops.reason()] if status == "stopped" else "completed", cfg, state, results)


def _stopped_before_training(cfg: Config, accelerator: Accelerator, stops: signals.StopRequests, reason: str,
                             found: tuple[Path, dict[str, Any]] | None) -> dict[str, Any]:
    """Nothing was trained yet: the newest checkpoint already holds the run, which ends here."""
    state = TrainState(**found[1]["state"]) if found is not None else TrainState(
        global_step=step_of(newest_intact(cfg.run_dir / "checkpoints")))
    log.warning("stop requested by %s (%s) before the first step: ending with the run as its newest checkpoint "
                "(step %d) holds it", signals.signal_names(stops.received) or "another rank", reason,
                state.global_step)
    leave_process_group(accelerator)
    return _result(STOPPED[reason], cfg, state, {})


def _fit(trainer: Trainer, data: ShardData, train_ds, state: TrainState) -> str:
    cfg = trainer.cfg
    while state.epoch < cfg.train.epochs and not (cfg.train.max_steps and state.global_step >= cfg.train.max_steps):
        train_ds.epoch, train_ds.skip_batches = state.epoch, state.batch_in_epoch
        loader = epoch_loader(cfg, train_ds)
        started = time.perf_counter()
        status = train_one_epoch(trainer, loader, state)
        if status == "stopped":
            return status
        if status == "done":
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        _end_of_epoch(trainer, data, state, time.perf_counter() - started)
    if cfg.train.max_steps and state.global_step >= cfg.train.max_steps and (
            not state.history or state.history[-1]["step"] != state.global_step):
        # a stop agreed at the last step checkpointed it before its validation (the loop above ends at once)
        _end_of_epoch(trainer, data, state, 0.0)
    return "done"


def _end_of_epoch(trainer: Trainer, data: ShardData, state: TrainState, seconds: float) -> None:
    """Validate, keep the best, checkpoint. ``state.epoch`` already counts the finished epoch."""
    cfg = trainer.cfg
    entry: dict[str, Any] = {"epoch": state.epoch - 1 if state.batch_in_epoch == 0 else state.epoch,
                             "step": state.global_step, "seconds": round(seconds, 2),
                             "jpeg_warnings": state.jpeg_warnings, "skipped_samples": state.skipped_samples}
    if state.global_step % cfg.train.log_every_steps:  # the run's totals so far, also when no log step ended the epoch
        trainer.board.scalars({"data/jpeg_warnings": state.jpeg_warnings,
                               "data/skipped_samples": state.skipped_samples}, state.global_step)
    improved, thresholds, weights = True, None, RAW
    if "val" in cfg.train.eval_splits:
        metrics, preds, weights = _validate_weights(trainer, data, state, entry)
        if cfg.train.tune_thresholds != "none":
            thresholds = tuned_thresholds(preds.probs, preds.targets, cfg.train.tune_thresholds).tolist()
        value = select_value(metrics, cfg.train.select_metric)
        improved = state.best_metric is None or value > state.best_metric
        if improved:
            state.best_metric, state.best_epoch, state.best_step = value, entry["epoch"], state.global_step
            state.best_weights = weights
        draw_validation(trainer, data, metrics, state.global_step, thresholds=thresholds, weights=weights)
        log.info("epoch %d: val %s = %.4f with %s weights (accuracy %.4f, balanced accuracy %.4f; best %.4f at epoch "
                 "%d), %.0fs", entry["epoch"], cfg.train.select_metric, value, weights, metrics["mean"]["accuracy"],
                 metrics["mean"]["balanced_accuracy"], state.best_metric, state.best_epoch, seconds)
    else:
        state.best_epoch, state.best_step = entry["epoch"], state.global_step
    state.history.append(entry)
    trainer.save(state, best=improved, thresholds=thresholds, weights=weights)


def _validate_weights(trainer: Trainer, data: ShardData, state: TrainState, entry: dict[str, Any]
                      ) -> tuple[dict, Predictions, str]:
    """Validation of the trained weights and, with ``train.ema_decay``, of their average: the better of the
    two by ``train.select_metric`` (the trained ones on a tie), both recorded in the epoch's ``entry``."""
    metrics, preds = validate(trainer, data, "val", state)
    entry["val"] = metrics["mean"]
    if trainer.ema is None:
        return metrics, preds, RAW
    ema_metrics, ema_preds = validate(trainer, data, "val", state, weights=EMA)
    entry["val_ema"] = ema_metrics["mean"]
    name = trainer.cfg.train.select_metric
    better = select_value(ema_metrics, name) > select_value(metrics, name)
    entry["weights"] = EMA if better else RAW
    return (ema_metrics, ema_preds, EMA) if better else (metrics, preds, RAW)


def _final_test(trainer: Trainer, data: ShardData, state: TrainState) -> dict[str, dict]:
    """Evaluate val and test with the best checkpoint's weights and thresholds."""
    cfg, acc = trainer.cfg, trainer.accelerator
    best = load_checkpoint(cfg.run_dir / "checkpoints" / BEST)
    # the weights validation chose (the EMA's, where it won), in the trained model's place
    acc.unwrap_model(trainer.model, keep_torch_compile=False).load_state_dict(selected_weights(best))
    state.best_weights = best.get("weights", RAW)
    thresholds = best.get("thresholds")
    results = {}
    for split in cfg.train.eval_splits:
        # val was logged at every epoch end already; a second point at the last step would duplicate it
        metrics, _ = validate(trainer, data, split, state, thresholds=thresholds, log_scalars=split != "val")
        results[split] = metrics
        if acc.is_main_process:
            log.info("%s", format_table(metrics, title=f"{split} (best epoch {state.best_epoch}, "
                                                      f"{state.best_weights} weights)"))
    if acc.is_main_process:
        write_results(cfg.run_dir, results, state, thresholds, data.attributes)
        final = {f"{s}_{m}": results[s]["mean"][m] for s in results for m in ("accuracy", "balanced_accuracy", "f1", "auroc")}
        trainer.board.hparams(cfg, final)
    acc.wait_for_everyone()
    return results


def _result(status: str, cfg: Config, state: TrainState, results: dict) -> dict[str, Any]:
    return {"status": status, "run_dir": str(cfg.run_dir), "global_step": state.global_step,
            "epoch": state.epoch, "best": {"epoch": state.best_epoch, "metric": cfg.train.select_metric,
                                           "value": state.best_metric}, "metrics": results}


def param_checksum(model: torch.nn.Module) -> dict[str, Any]:
    """This rank's weights in brief: the float64 sum of |p| and the sha256 of the parameters' bytes.

    DDP keeps the parameters identical on every rank, to the bit; equal checksums across ranks are
    the evidence that gradients really were synchronised (a rank training alone drifts away).
    """
    digest, total = hashlib.sha256(), 0.0
    for p in model.parameters():
        t = p.detach().cpu().contiguous().reshape(-1)
        digest.update(t.view(torch.uint8).numpy().tobytes())
        total += float(t.double().abs().sum())
    return {"abs_sum": total, "sha256": digest.hexdigest()}


def _close_run(board: Board, run_dir: Path, rank: int, state: TrainState, checksum: dict[str, Any], *,
               failed: bool) -> None:
    """Flush TensorBoard and write this rank's stats. After a failure (a full disk, say) these
    writes may fail too; they are logged then, so the error that ended the run is the one reported."""
    for write in (board.close, lambda: _write_rank_stats(run_dir, rank, state, checksum)):
        try:
            write()
        except OSError as exc:
            if not failed:
                raise
            log.warning("while ending the failed run: %s", exc)


def _write_rank_stats(run_dir: Path, rank: int, state: TrainState, checksum: dict[str, Any]) -> None:
    """What this rank trained on, and the checksum of the weights it trained (no collective: this also runs
    when a peer has died)."""
    folder = run_dir / "rank_stats"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"rank{rank}.json", {"rank": rank, "host": platform.node(), "pid": os.getpid(),
                                              "samples_seen": state.samples_seen, "global_step": state.global_step,
                                              "epoch": state.epoch, "param_checksum": checksum})


def interrupted(cfg: Config | None) -> str:
    """What a run stopped by a forced Ctrl-C (no checkpoint of now) says, with the checkpoint to resume from."""
    return f"interrupted; {resume_hint(cfg.run_dir / 'checkpoints', fix='')}" if cfg is not None else "interrupted"


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="celeba-dist train", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--resume", default=None, help="auto (default), none, or a checkpoint file")
    parser.add_argument("--verify-shards", action="store_true",
                        help="check every shard's sha256 against the manifest before the first step")
    args = parser.parse_args(argv)
    if args.resume:
        args.set = [*args.set, f"run.resume={args.resume}"]
    if args.verify_shards:
        args.set = [*args.set, "data.check_shards=sha256"]
    cfg = None
    try:
        cfg = config_from_args(args)
        result = main(cfg)
    except Exception as exc:
        expected = (ConfigError, ManifestError, NonFiniteLossError, FileNotFoundError, DataError, DiskFullError,
                    runlock.RunLockedError, CacheMemoryError, UnsafeCheckpointError)
        if not isinstance(exc, expected):
            logging.getLogger("celeba_dist").debug("run failed", exc_info=True)  # the rank's log file keeps it
        return report_error("celeba-dist train", exc)
    except KeyboardInterrupt:  # before main() took the signals, or Ctrl-C pressed again: no checkpoint of now
        logging.getLogger("celeba_dist").debug("interrupted", exc_info=True)  # where: the rank's log file keeps it
        print(f"celeba-dist train: {interrupted(cfg)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result["status"] in STOPPED.values():
        return EXIT_PREEMPTED
    return 0 if result["status"] == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(cli_main())
