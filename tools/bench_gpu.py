"""Does the data wait? Real training runs of the four models under data.cache none | host | device.

Each run is ``celeba_dist.train.main`` on synthetic shards (bf16, channels_last by default), stopped by
``train.max_steps``; the figures come from its own TensorBoard scalars and log:

  img/s          train/images_per_s, mean over the log windows after the first (warm-up)
  data wait      train/data_wait_fraction, the same windows
  fill s         seconds the rank took to decode its share into the cache (the log's "cache:" line)
  peak GPU GiB   train/gpu_mem_gb, the run's maximum
  epoch 2 s      with --epochs N >= 2: the second epoch's training seconds (metrics.json's history), and
                 cache=none's over it (the speed-up once the cache is full)

``--caches device device-decode`` compares the device cache's fill through the CPU loader workers (libjpeg-turbo
at a DCT scale) with TorchCodec's decode on the GPU (nvJPEG, full size, resampled there:
``data.cache_decode=device``); its fill s is the figure to compare before making it a default.

``--headline`` then trains the smiling recipe for 30 epochs over ``--headline-images`` synthetic images
(202,599, full CelebA's size, of which the official fractions make 162,770 the training split) with
``data.cache=device`` at batch 512 (Adam's learning rate 0.008: 8x the recipe's 0.001 at 16x its batch 32,
scaled linearly from there with ``--headline-batch``), a cosine schedule, no dropout, He-initialised convs
and centred inputs (``model.init=kaiming``, ``data.normalize=imagenet``: as the learning test), and reports
the time to fill the cache apart from the training time, and the test accuracy.

Targets, each printed with its verdict: data wait < 0.02 for every model with cache=device; simple_cnn with
cache=device >= 5x the img/s of the CPU loader (cache=none); the headline under 2 minutes of training on
one H200, to the learning test's bar (test accuracy >= 0.95 on Smiling, >= 0.90 mean).

    python tools/bench_gpu.py [--work-dir /tmp/bench-gpu] [--num-images 20000] [--steps 150] [--headline]

One machine, one run: the ratios are only meaningful within it. On a CPU machine it runs too (the
"device" is then the CPU; use --precision no there): tests/test_bench_gpu.py runs every model, cache and
the headline that way, tiny, so that the one GPU command is known to work before a GPU is lent.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# (name, recipe, batch size, overrides): the recipes' models and transforms; no ImageNet download
MODELS = {
    "simple_cnn": ("smiling_simple_cnn", 512, ["data.attributes=drawn"]),
    "celeb_cnn": ("attrs40_celeb_cnn", 256, []),
    "resnext50_32x4d": ("attrs40_resnext50", 128, ["model.pretrained=none"]),
    "resnet18_lstm_attn": ("male_resnet18_lstm_attn", 128, ["model.pretrained=none"]),
}


# a row's name → its overrides; device-decode fills the device cache with TorchCodec's nvJPEG decode
CACHES = {"none": ["data.cache=none"], "host": ["data.cache=host"], "device": ["data.cache=device"],
          "device-decode": ["data.cache=device", "data.cache_decode=device"]}


def make_shards(work: Path, num_images: int, workers: int) -> Path:
    shards = work / f"shards-{num_images}"
    if not (shards / "manifest.json").is_file():
        source = work / f"celeba-{num_images}"
        run = [sys.executable, "-m", "celeba_dist"]
        subprocess.run([*run, "synth", str(source), "--num-images", str(num_images), "--workers", str(workers)],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*run, "pack", str(source), str(shards), "--workers", str(workers)], check=True,
                       stdout=subprocess.DEVNULL)
    return shards


def train(shards: Path, run_dir: Path, recipe: str, overrides: list[str]) -> tuple[dict, float]:
    """Run ``main`` once; returns (its result, wall seconds)."""
    from celeba_dist.config import load_config
    from celeba_dist.train.main import main

    cfg = load_config(recipe, overrides, data_dir=str(shards), run_dir=str(run_dir))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = main(cfg)
    seconds = time.perf_counter() - started
    gc.collect()  # the cache goes with the run
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result, seconds


def scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def fill_seconds(run_dir: Path) -> float | None:
    found = re.search(r"train \(rank 0\) cache: .* in ([\d.]+)s", (run_dir / "logs" / "rank0.log").read_text())
    return float(found.group(1)) if found else None


def measure(shards: Path, work: Path, model: str, cache: str, args) -> dict:
    recipe, batch, extra = MODELS[model]
    batch = args.batch_size or batch
    run_dir = work / "runs" / f"{model}-{cache}-{time.time_ns()}"
    overrides = [*extra, *CACHES[cache], f"data.batch_size={batch}", f"data.num_workers={args.workers}",
                 f"train.precision={args.precision}", f"train.channels_last={str(args.channels_last).lower()}",
                 *([f"train.epochs={args.epochs}"] if args.epochs else [f"train.max_steps={args.steps}", "train.epochs=1000"]),
                 f"train.log_every_steps={args.log_every}",
                 "train.checkpoint_every_steps=0", "train.eval_splits=[]", "log.image_grid_size=0",
                 "log.progress_bar=false"]
    _, seconds = train(shards, run_dir, recipe, overrides)
    values = scalars(run_dir)
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    rates, waits = values["train/images_per_s"][1:], values["train/data_wait_fraction"][1:]
    return {"model": model, "cache": cache, "batch": batch, "img_s": statistics.mean(rates) if rates else None,
            "data_wait": statistics.mean(waits) if waits else None, "fill_s": fill_seconds(run_dir),
            "peak_gib": max(values.get("train/gpu_mem_gb", [0.0]) or [0.0]), "seconds": round(seconds, 1),
            "epoch_s": [e["seconds"] for e in history]}


def measure_or_fail(shards: Path, work: Path, model: str, cache: str, args) -> dict:
    """:func:`measure`'s row, or for a run that fails (a carried TorchCodec without CUDA decoding, the GPU's
    memory) the row with its error and no figures: the other rows are measured all the same, in the one
    device call a GPU session has for them. The script then exits 1."""
    try:
        return measure(shards, work, model, cache, args)
    except Exception as exc:  # noqa: BLE001 -- any failure of one run is that row's result
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"model": model, "cache": cache, "batch": args.batch_size or MODELS[model][1], "img_s": None,
                "data_wait": None, "fill_s": None, "peak_gib": None, "seconds": None, "epoch_s": [],
                "error": failure(exc)}


def failure(exc: BaseException) -> str:
    """A failed run in one line: its exception's type and first line."""
    text = str(exc).strip().splitlines()
    print(f"run failed: {type(exc).__name__}: {str(exc)}", file=sys.stderr, flush=True)
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


HEADLINE_BATCH, HEADLINE_LR = 512, 0.008  # Adam: 8x the recipe's 0.001 at 16x its batch of 32
BAR = {"Smiling": 0.95, "mean": 0.90}  # the learning test's test accuracies (tests/test_learning.py)
TARGETS = {"data_wait": 0.02, "simple_cnn_speedup": 5.0, "headline_train_s": 120.0}
HEADLINE_RUN = (30, 162_770)  # (epochs, training images) the time target is for


def headline(work: Path, args) -> dict:
    shards = make_shards(work, args.headline_images, args.workers)
    train_images = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["num_samples"]
    run_dir = work / "runs" / f"headline-{time.time_ns()}"
    lr = HEADLINE_LR * args.headline_batch / HEADLINE_BATCH
    overrides = ["data.attributes=drawn", "data.cache=device", f"data.batch_size={args.headline_batch}",
                 f"optim.lr={lr:g}", "sched.name=cosine", "model.dropout=0.0", "model.init=kaiming",
                 "data.normalize=imagenet", f"data.num_workers={args.workers}",
                 f"train.precision={args.precision}", f"train.channels_last={str(args.channels_last).lower()}",
                 f"train.epochs={args.headline_epochs}", "train.checkpoint_every_steps=0", "log.image_grid_size=0",
                 "log.progress_bar=false", "train.log_every_steps=50"]
    result, seconds = train(shards, run_dir, "smiling_simple_cnn", overrides)
    epochs = json.loads((run_dir / "metrics.json").read_text())["history"]
    test = result["metrics"]["test"]
    return {"images": args.headline_images, "train_images": train_images, "epochs": len(epochs),
            "batch": args.headline_batch, "lr": lr, "total_s": round(seconds, 1), "fill_s": fill_seconds(run_dir),
            "train_s": round(sum(e["seconds"] for e in epochs), 1),
            "test_smiling_accuracy": test["attributes"]["Smiling"]["accuracy"],
            "test_mean_accuracy": test["mean"]["accuracy"]}


def verdicts(rows: list[dict], head: dict | None) -> list[str]:
    """One line per target this run can judge: the figure, the target, met or MISSED."""
    lines = []

    def judge(what: str, value: float | None, target: float, *, below: bool = False) -> None:
        met = value is not None and (value < target if below else value >= target)
        shown = "-" if value is None else f"{value:.3f}"
        lines.append(f"{what}: {shown} (target {'<' if below else '>='} {target:g}: {'met' if met else 'MISSED'})")

    by = {(r["model"], r["cache"]): r for r in rows}
    for (model, cache), r in by.items():
        if cache == "device":
            judge(f"data wait, {model}, cache=device", r["data_wait"], TARGETS["data_wait"], below=True)
    device, none = by.get(("simple_cnn", "device")), by.get(("simple_cnn", "none"))
    if device and none:
        ratio = device["img_s"] / none["img_s"] if device["img_s"] and none["img_s"] else None
        judge("img/s, simple_cnn, cache=device / cache=none", ratio, TARGETS["simple_cnn_speedup"])
    if head and head.get("error"):
        lines.append(f"headline: failed ({head['error']}): MISSED")
    elif head:
        what = f"headline training seconds ({head['epochs']} epochs, {head['train_images']} training images)"
        if (head["epochs"], head["train_images"]) == HEADLINE_RUN:
            judge(what, head["train_s"], TARGETS["headline_train_s"], below=True)
        else:  # the time target is for the full run only
            lines.append(f"{what}: {head['train_s']:.3f} (target < {TARGETS['headline_train_s']:g} for "
                         f"{HEADLINE_RUN[0]} epochs over {HEADLINE_RUN[1]:,} training images: not judged)")
        judge("headline test accuracy, Smiling", head["test_smiling_accuracy"], BAR["Smiling"])
        judge("headline test accuracy, mean", head["test_mean_accuracy"], BAR["mean"])
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{gpu}; {cpu}, {os.cpu_count()} cores; torch {torch.__version__}"


def table(rows: list[dict]) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| model | batch | cache | img/s | data wait | fill s | peak GPU GiB | img/s vs none | epoch 2 s, vs none |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = {r["model"]: r for r in rows if r["cache"] == "none"}
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['batch']} | {r['cache']} | failed: {r['error']} | | | | | |")
            continue
        none = base.get(r["model"])
        ratio = r["img_s"] / none["img_s"] if none and r["img_s"] and none["img_s"] else None
        second = r["epoch_s"][1] if len(r["epoch_s"]) > 1 else None
        speedup = none["epoch_s"][1] / second if none and second and len(none["epoch_s"]) > 1 else None
        lines.append(f"| {r['model']} | {r['batch']} | {r['cache']} | {fmt(r['img_s'], '.0f')} | "
                     f"{fmt(r['data_wait'], '.3f')} | {fmt(r['fill_s'], '.1f')} | {fmt(r['peak_gib'] or None, '.2f')} | "
                     f"{fmt(ratio, '.2f')} | {fmt(second, '.1f')}{', ' + format(speedup, '.2f') + 'x' if speedup else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench-gpu"))
    parser.add_argument("--num-images", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--epochs", type=int, default=0, help="whole epochs instead of --steps (epoch 2's time)")
    parser.add_argument("--batch-size", type=int, default=0, help="per model (default: its entry in MODELS)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS),
                        help="none at all: the headline alone")
    parser.add_argument("--caches", nargs="+", default=["none", "host", "device"], choices=list(CACHES),
                        help="device-decode: cache=device filled by decoding on the GPU (compare its fill s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="loader workers (default: all cores)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--headline", action="store_true", help="also the 30-epoch smiling run (see above)")
    parser.add_argument("--headline-images", type=int, default=202_599,
                        help="synthetic images in all (default full CelebA's: 162,770 of them training images)")
    parser.add_argument("--headline-epochs", type=int, default=30)
    parser.add_argument("--headline-batch", type=int, default=HEADLINE_BATCH, help="learning rate scaled linearly")
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here, after every run")
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "rows": []}
    rows = report["rows"]
    if args.models:
        shards = make_shards(args.work_dir, args.num_images, args.workers)
        length = f"{args.epochs} epochs" if args.epochs else f"{args.steps} steps"
        print(f"machine: {report['machine']}; {args.precision}, channels_last={args.channels_last}, {length}, "
              f"{args.workers} loader workers, {args.num_images} synthetic images", flush=True)
        for model in args.models:
            for cache in args.caches:
                rows.append(measure_or_fail(shards, args.work_dir, model, cache, args))
                print(json.dumps(rows[-1]), flush=True)
                save(report, args.out)  # a command stopped at its time limit keeps the rows it measured
        print(table(rows), flush=True)
    if args.headline:
        try:
            report["headline"] = headline(args.work_dir, args)
        except Exception as exc:  # noqa: BLE001 -- reported, and the verdicts still printed
            report["headline"] = {"error": failure(exc)}
        print("headline:", json.dumps(report["headline"]), flush=True)
    report["verdicts"] = verdicts(rows, report.get("headline"))
    print("\n".join(["targets:", *report["verdicts"]]), flush=True)
    save(report, args.out)
    failed = [r for r in [*rows, report.get("headline") or {}] if r.get("error")]
    return 1 if failed else 0


def save(report: dict, path: Path | None) -> None:
    from celeba_dist.diskio import write_json

    if path is not None:
        write_json(path, report, indent=1)

if __name__ == "__main__":
    raise SystemExit(main())
