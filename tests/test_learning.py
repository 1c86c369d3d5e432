"""Learning is tested, not assumed: simple_cnn on the synthetic CelebA's drawn attributes.

A short CPU training (all drawn attributes) must reach >= 0.95 test accuracy on Smiling and >= 0.90 mean
accuracy over the drawn attributes: streamed (data.cache=none), from the host cache, and in two-process DDP from
the device cache, as issue 11 asks of the caches.

The runs start from He-initialised convs (model.init=kaiming) on centred inputs (data.normalize=imagenet).
With the model's default init on pixels / 255 the bar was met at train.seed=0 only: the streamed run ended at
0.609 (seed 1) and 0.921 (seed 2) test accuracy on Smiling, which sat at chance for hundreds of steps and rose
late or never. With both, the recipe reaches 0.975-0.997 at seeds 0 to 3 (README, tests section).

Since stop 27 the runs are 48x48 (shards pre-resized to 48x59, CelebA's aspect) instead of the recipe's 64x64, and
the two cached runs use train.channels_last=true: the model's arithmetic is CPU-bound here, and that halves each
run's time for CI. Every variant meets the bar at train.seed 0 to 3 at that size (README).
"""
from __future__ import annotations

import json
import subprocess

import pytest

from celeba_dist.attributes import DRAWN_ATTRIBUTES
from celeba_dist.config import load_config
from celeba_dist.evaluate import evaluate_checkpoint
from celeba_dist.train.main import main
from shardkit import synthetic_shards
from test_train import accelerate_cmd, assert_ranks_hold_the_same_weights, cpu_env, rank_stats

# The smiling recipe's model and optimizer; He-initialised convs on centred inputs, a cosine schedule, no dropout
# and batches of 16: 10 epochs of 3,200 images (2,000 steps). Fewer epochs were not enough at every seed (at
# 64x64: 8 and 7 left seed 3 at 0.911 and 0.919 on Smiling, 5 left seed 0 at 0.942).
RECIPE = ["data.attributes=drawn", "train.epochs=10", "optim.lr=0.003", "sched.name=cosine", "model.dropout=0.0",
          "model.init=kaiming", "data.normalize=imagenet", "data.image_size=[48, 48]",
          "data.num_workers=1", "log.progress_bar=false", "log.image_grid_size=0", "train.log_every_steps=50"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # pre-resized shards (--resize 48x59, CelebA's aspect at 48 wide): crop178_resize then only crops, streamed or
    # cached, and the CPU time goes to training
    return synthetic_shards(tmp_path_factory.mktemp("learn"), num_images=4000, samples_per_shard=64, seed=1,
                            extra=("--resize", "48x59"))


def check_bar(metrics: dict) -> None:
    test = metrics["test"]
    assert set(test["attributes"]) == set(DRAWN_ATTRIBUTES)
    assert test["attributes"]["Smiling"]["accuracy"] >= 0.95, test["attributes"]["Smiling"]
    assert test["mean"]["accuracy"] >= 0.90, test["mean"]


# The recipes' newer options, all at once: an EMA of the weights, flip TTA and thresholds tuned for accuracy; and
# the channels_last layout (the same arithmetic, about a fifth faster on this CPU).
EVERYTHING = ["train.ema_decay=0.99", "eval.tta=flip", "train.tune_thresholds=accuracy", "train.channels_last=true"]


@pytest.mark.slow
@pytest.mark.parametrize("cache, options", [("none", []), ("host", EVERYTHING)], ids=["none", "host-ema-tta"])
def test_simple_cnn_learns_the_drawn_attributes(shards, tmp_path, cache, options):
    cfg = load_config("smiling_simple_cnn", [*RECIPE, "data.batch_size=16", f"data.cache={cache}", *options],
                      data_dir=str(shards), run_dir=str(tmp_path / "one"))
    result = main(cfg)
    check_bar(result["metrics"])
    if "eval.tta=flip" in options:  # the same best weights and thresholds without the mirror do no better
        plain = evaluate_checkpoint(tmp_path / "one" / "checkpoints" / "best.pt", split="test", data_dir=None,
                                    overrides=["eval.tta=none"])
        assert result["metrics"]["test"]["mean"]["accuracy"] >= plain["mean"]["accuracy"] - 0.005, plain["mean"]


@pytest.mark.slow
def test_two_process_ddp_learns_the_same(shards, tmp_path):
    """Two-process DDP with data.cache=device (the device is the CPU here): each rank decodes its share once, on
    the device (data.cache_decode=device: TorchCodec, nvJPEG's call on a GPU), keeps an EMA of the weights
    (every rank averages the same weights), and the run reaches the bar. (The streamed DDP run this test
    also made is left out to keep CI's time: streamed learning is the 1-process test's, and DDP's equal
    weights and exact counts on the streamed path are test_train.py's.)"""
    run_dir = tmp_path / "ddp"
    cmd = accelerate_cmd("-m", "celeba_dist.train", "--config", "smiling_simple_cnn", "--data", str(shards),
                         "--run-dir", str(run_dir), "--set", *RECIPE, "data.batch_size=8",  # global batch 16
                         "data.cache=device", "data.cache_decode=device", "train.ema_decay=0.99",
                         "train.channels_last=true")
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((run_dir / "env.json").read_text())["world_size"] == 2
    assert_ranks_hold_the_same_weights(rank_stats(run_dir))
    for rank in (0, 1):  # each rank filled its caches through the device decoder
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"train (rank {rank}) cache:" in log and "decoded on cpu" in log
    check_bar(json.loads((run_dir / "metrics.json").read_text()))
