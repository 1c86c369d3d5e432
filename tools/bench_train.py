"""Training-step throughput: our engine against a minimal hand-written PyTorch loop.

Both train the same model with the same optimizer and precision on the same uint8 batches held
in memory (data loading is measured by bench_loader.py), so the ratio is the engine's own
overhead: Accelerate's wrappers, normalisation on the device, the loss/stop bookkeeping.
Target: ours >= 0.95 of the minimal loop.

    python tools/bench_train.py [--models simple_cnn] [--steps 60] [--precision no|bf16|fp16]
"""
from __future__ import annotations

import dataclasses
import argparse
import platform
import time

import torch


def batches(n: int, batch_size: int, size: tuple[int, int], attrs: int) -> list:
    """``n`` random batches shaped as the loader yields them (:class:`celeba_dist.data.streams.Batch`)."""
    from celeba_dist.data.streams import Batch, SampleIssues

    g = torch.Generator().manual_seed(0)
    return [Batch(torch.randint(0, 256, (batch_size, 3, *size), dtype=torch.uint8, generator=g),
                  torch.randint(0, 2, (batch_size, attrs), generator=g).float(), [str(i)] * batch_size, SampleIssues())
            for i in range(n)]


def minimal_loop(model_name: str, data: list, lr: float, precision: str, device: torch.device) -> float:
    from celeba_dist.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, num_attributes=data[0][1].shape[1]).to(device).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start = 0.0
    for i, (images, labels, *_) in enumerate(data):
        if i == 5:  # warm-up done
            _sync(device)
            start = time.perf_counter()
        x, y = images.to(device).float().div_(255), labels.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return (len(data) - 5) * data[0][0].shape[0] / (time.perf_counter() - start)


def ours(model_name: str, data: list, lr: float, precision: str) -> float:
    from celeba_dist.train.board import Board
    from celeba_dist.config import load_config
    from celeba_dist.train.distributed import build_accelerator
    from celeba_dist.train.engine import TrainState, Trainer, train_one_epoch
    from celeba_dist.train.losses import build_loss
    from celeba_dist.models import build_model
    from celeba_dist.train.optim import build_optimizer, build_scheduler

    cfg = load_config("smiling_simple_cnn", [f"model.name={model_name}", f"optim.lr={lr}", f"train.precision={precision}",
                                             "log.progress_bar=false", "train.checkpoint_every_steps=0",
                                             f"train.log_every_steps={len(data)}"])
    acc = build_accelerator(precision=cfg.train.precision,
                            collective_timeout_min=cfg.train.collective_timeout_min)
    torch.manual_seed(0)
    model = build_model(model_name, num_attributes=data[0][1].shape[1])
    opt = build_optimizer(model.parameters(), **dataclasses.asdict(cfg.optim))
    sched = build_scheduler(opt, **dataclasses.asdict(cfg.sched), steps_per_epoch=len(data), total_steps=len(data))
    model, opt = acc.prepare(model, opt)
    board = Board(None, enabled=False)
    trainer = Trainer(cfg, acc, model, opt, sched, build_loss("bce").to(acc.device), board, len(data) - 5,
                      len(data), lambda state: None)
    warm = Trainer(cfg, acc, model, opt, sched, trainer.loss_fn, board, 5, len(data), lambda state: None)
    train_one_epoch(warm, data[:5], TrainState())
    _sync(acc.device)
    start = time.perf_counter()
    train_one_epoch(trainer, data[5:], TrainState())
    _sync(acc.device)
    return (len(data) - 5) * data[0][0].shape[0] / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    from celeba_dist.models import model_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["simple_cnn"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; precision {args.precision}; batch {args.batch_size}; {args.steps} steps; best of {args.repeats}")
    print(f"{'model':<22}{'input':>10}{'minimal img/s':>15}{'ours img/s':>12}{'ours/minimal':>14}")
    for model_name in args.models:
        size = model_spec(model_name).input_size
        data = batches(args.steps + 5, args.batch_size, size, 40)
        best_min = best_ours = 0.0
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
            best_min = max(best_min, minimal_loop(model_name, data, 1e-4, args.precision, device))
            best_ours = max(best_ours, ours(model_name, data, 1e-4, args.precision))
        print(f"{model_name:<22}{'x'.join(map(str, size)):>10}{best_min:>15.0f}{best_ours:>12.0f}{best_ours / best_min:>14.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
