"""main(config) end to end on real shards: one process, two-process DDP on CPU, eval, predict, TensorBoard."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from celeba_dist.config import config_from_tree, load_config
from celeba_dist.data.streams import ShardData, eval_stream
from celeba_dist.data.transforms import build_transform
from celeba_dist.train.board import attention_overlay
from celeba_dist.train.build import build_model_for
from celeba_dist.train.checkpoint import list_checkpoints, load_checkpoint
from celeba_dist.train.engine import NonFiniteLossError, prepare_batch
from celeba_dist.train.main import main
from celeba_dist.train.metrics import compute_metrics
from evalkit import eval_predictions, eval_probabilities
from shardkit import synthetic_shards

FAST = ["data.batch_size=16", "data.num_workers=1", "data.image_size=[32, 32]", "log.progress_bar=false",
        "train.log_every_steps=2", "train.checkpoint_every_steps=5"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("train"), num_images=300, samples_per_shard=16)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "single"
    cfg = load_config("smiling_simple_cnn", [*FAST, "train.epochs=2", "data.attributes=[Smiling, Male, Eyeglasses]"],
                      data_dir=str(shards), run_dir=str(run_dir))
    result = main(cfg)
    return run_dir, result


def manifest_count(shards, split):
    return json.loads((shards / "manifest.json").read_text())["splits"][split]["num_samples"]


def cpu_env():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CELEBA_DIST_REQUIRE_SLURM", None)
    return env


def accelerate_cmd(*args: str, processes: int = 2) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    return [*launcher, *args]


def step_of(path) -> int:
    return int(path.stem.split("-")[1])


def rank_stats(run_dir, world: int = 2) -> list[dict]:
    return [json.loads((run_dir / "rank_stats" / f"rank{r}.json").read_text()) for r in range(world)]


def assert_ranks_hold_the_same_weights(stats: list[dict]) -> None:
    """DDP's evidence: every rank ends with the same parameters, to the bit. Ranks start from different
    seeds (DDP broadcasts rank 0's weights) and read different shards, so a rank training alone differs."""
    sums = [s["param_checksum"] for s in stats]
    assert all(c == sums[0] for c in sums), sums
    assert sums[0]["abs_sum"] > 0


def test_run_directory_holds_everything(trained, shards):
    run_dir, result = trained
    assert result["status"] == "completed"
    for name in ("config.yaml", "env.json", "metrics.json", "metrics_per_attribute.csv", "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    attributes = ["Smiling", "Male", "Eyeglasses"]
    rows = list(csv.DictReader(open(run_dir / "metrics_per_attribute.csv")))
    assert [(r["split"], r["attribute"]) for r in rows] == [(s, a) for s in ("val", "test") for a in attributes]
    for split in ("val", "test"):
        # the reported metrics are those of eval's scores of the best checkpoint, recomputed here
        preds = eval_predictions(run_dir / "checkpoints" / "best.pt", split)
        recomputed = json.loads(json.dumps(compute_metrics(preds.probs, preds.targets, attributes)))
        assert {k: v for k, v in metrics[split].items() if k != "data_issues"} == recomputed
        assert metrics[split]["data_issues"] == {"skipped_samples": 0, "jpeg_warnings": 0, "skipped": [], "warned": []}
        assert metrics[split]["mean"]["num_samples"] == manifest_count(shards, split)
        for row in (r for r in rows if r["split"] == split):  # and the CSV holds the same counts
            counts = ("tp", "fp", "tn", "fn")
            assert [int(row[k]) for k in counts] == [recomputed["attributes"][row["attribute"]][k] for k in counts]
    assert metrics["best_epoch"] in (0, 1)
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]
    # pruned to train.keep_last (2) of the checkpoints every 5 steps and at epoch ends; best.pt is the best step's
    spe = manifest_count(shards, "train") // 16
    saved = sorted(set(range(5, 2 * spe + 1, 5)) | {spe, 2 * spe})
    assert [step_of(p) for p in list_checkpoints(run_dir / "checkpoints")] == saved[::-1][:2]
    best = run_dir / "checkpoints" / "best.pt"
    assert load_checkpoint(best)["state"]["global_step"] == metrics["best_step"]
    if metrics["best_step"] in saved[-2:]:
        assert os.path.samefile(best, run_dir / "checkpoints" / f"step-{metrics['best_step']:09d}.pt")
    else:  # a hard link outlives the pruned file's name
        assert best.stat().st_nlink == 1


def test_tensorboard_has_scalars_images_and_hparams(trained):
    run_dir, _ = trained
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/data_wait_fraction", "val/accuracy",
                "val/balanced_accuracy", "val/auroc", "test/accuracy", "val_attr/Smiling", "test_attr/Eyeglasses"):
        assert tag in tags["scalars"], tag
    for tag in ("val/predictions", "val/attribute_accuracy"):
        assert tag in tags["images"], tag
    loss = acc.Scalars("train/loss")
    assert len(loss) >= 3 and all(torch.isfinite(torch.tensor(e.value)) for e in loss)
    hparams = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(1e-3)
    assert start.hparams["model.name"].string_value == "simple_cnn"
    assert "hparam/test_accuracy" in tags["scalars"]


def test_resume_of_a_finished_run_trains_no_further(trained, shards):
    run_dir, first = trained
    cfg = load_config("smiling_simple_cnn", [*FAST, "train.epochs=2", "data.attributes=[Smiling, Male, Eyeglasses]"],
                      data_dir=str(shards), run_dir=str(run_dir))
    again = main(cfg)
    assert again["global_step"] == first["global_step"]
    assert again["metrics"]["test"]["mean"] == first["metrics"]["test"]["mean"]


def test_two_process_ddp_on_cpu_with_accelerate_launch(shards, tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = accelerate_cmd("-m", "celeba_dist.train", "--config", "smiling_simple_cnn", "--data", str(shards),
                         "--run-dir", str(run_dir), "--set", *FAST, "train.epochs=1")
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env = json.loads((run_dir / "env.json").read_text())
    assert env["world_size"] == 2 and "MULTI_CPU" in env["distributed_type"]
    stats = rank_stats(run_dir)
    steps = manifest_count(shards, "train") // (16 * 2)
    assert [s["samples_seen"] for s in stats] == [steps * 16, steps * 16]  # both ranks trained, equally
    assert_ranks_hold_the_same_weights(stats)  # and their gradients were synchronised
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["mean"]["num_samples"] == manifest_count(shards, "test")
    assert metrics["history"][0]["step"] == steps
    # the log line of every epoch is printed once, by rank 0 only
    assert proc.stdout.count("epoch 0: val") == 1
    # and TensorBoard is written by rank 0 alone: one event file, every scalar once per step
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(2, steps + 1, 2))  # train.log_every_steps=2
    assert [e.step for e in acc.Scalars("val/accuracy")] == [steps]
    # train/loss is the mean over both ranks' batches (their loss sums over their step counts, added): the BCE of
    # one attribute, near ln 2 at the start and falling; over one rank's count alone it would read twice that
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert 0.5 < losses[0] < 0.8 and all(0.1 < v < 0.8 for v in losses), losses
    # both ranks tore the process group down together before exiting (an exit with a live Gloo group can hang)
    for r in (0, 1):
        assert f"rank {r} left the process group" in (run_dir / "logs" / f"rank{r}.log").read_text()


def test_eval_one_and_two_processes_count_identically(trained, shards, tmp_path):
    run_dir, _ = trained
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    # val: 29 samples, an odd count, so the two ranks' shares differ in size (gathering pads the shorter one)
    assert manifest_count(shards, "val") % 2
    base = ["--run", str(run_dir), "--data", str(shards), "--split", "val", "--set", "data.num_workers=2"]
    p1 = subprocess.run([sys.executable, "-m", "celeba_dist.evaluate", *base[:-2], "--out", str(one)],
                        env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = subprocess.run(accelerate_cmd("-m", "celeba_dist.evaluate", *base, "--out", str(two)), env=cpu_env(),
                        capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0, p2.stderr[-3000:]
    m1, m2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert m1["mean"]["num_samples"] == m2["mean"]["num_samples"] == manifest_count(shards, "val")
    assert p2.stdout.count("metrics written to") == 1 and p2.stdout.count("val: ") == 1  # rank 0 alone reports
    for name, v in m1["attributes"].items():
        assert (v["tp"], v["fp"], v["tn"], v["fn"]) == tuple(m2["attributes"][name][k] for k in ("tp", "fp", "tn", "fn"))
        assert v["auroc"] == pytest.approx(m2["attributes"][name]["auroc"], abs=1e-9)


def test_evaluation_refuses_a_duplicate_that_hides_a_missing_sample(trained):
    """A loader that gives one sample twice and drops another gives the manifest's count but not its samples:
    every metric would be biased without a word, so ``evaluate`` refuses, saying how many were distinct."""
    from celeba_dist.train.build import eval_loader
    from celeba_dist.train.distributed import build_accelerator
    from celeba_dist.train.engine import evaluate
    from celeba_dist.train.ema import selected_weights
    from celeba_dist.train.losses import LOSSES

    run_dir, _ = trained
    ckpt = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    cfg = config_from_tree(ckpt["config"], ["model.pretrained=none", "run.resume=none"])
    accelerator = build_accelerator(precision=cfg.train.precision)
    data = ShardData(cfg.data.root, ckpt["attributes"])
    model = build_model_for(cfg, len(data.attributes))
    model.load_state_dict(selected_weights(ckpt))
    batches = list(eval_loader(cfg, data, "val", accelerator))
    kwargs = dict(accelerator=accelerator, cfg=cfg, to_prob=LOSSES[cfg.loss.name].to_prob, split="val",
                  expected=data.split("val").num_samples, num_attributes=len(data.attributes))
    assert len(evaluate(model, batches, **kwargs).keys) == 29  # the real batches: every sample once
    images, labels, keys, issues = batches[-1]
    batches[-1] = (images, labels, [*keys[:-1], batches[0][2][0]], issues)  # its last sample is the first's again
    with pytest.raises(RuntimeError, match=r"evaluation on val saw 29 samples \(28 distinct, 0 of them skipped\) "
                                           r"across 1 processes; the manifest has 29"):
        evaluate(model, batches, **kwargs)


def split_ids(shards, split: str) -> list[str]:
    """The split's sample ids, read from the tar files with plain webdataset."""
    import webdataset as wds

    manifest = json.loads((shards / "manifest.json").read_text())
    urls = [str(shards / s["file"]) for s in manifest["splits"][split]["shards"]]
    return sorted(s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False))


def test_predict_writes_one_row_per_image(trained, shards, tmp_path):
    """predict's probabilities are eval's, for shards and for a folder of the same images searched recursively."""
    import shutil

    from celeba_dist.predict import main as predict_main

    run_dir, _ = trained
    best = run_dir / "checkpoints" / "best.pt"
    attributes = ["Smiling", "Male", "Eyeglasses"]
    expected = eval_probabilities(best, "test")
    ids = split_ids(shards, "test")
    assert sorted(expected) == ids

    def check(rows: list[dict]) -> None:
        assert sorted(r["id"] for r in rows) == ids
        for row in rows:
            probs = [float(row[f"{a}_prob"]) for a in attributes]
            assert probs == pytest.approx(expected[row["id"]], abs=1e-6), row["id"]  # the CSV keeps 6 decimals
            assert [int(row[a]) for a in attributes] == [int(p >= 0.5) for p in expected[row["id"]]]

    out = tmp_path / "pred.csv"
    assert predict_main(["--checkpoint", str(best), "--input", str(shards), "--split", "test", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["id", *attributes, *[f"{a}_prob" for a in attributes]]
    check(rows)
    # the same images as files, spread over nested folders beside a file that is not an image
    images = shards.parent / "celeba-300-0" / "img_align_celeba"
    folder = tmp_path / "photos"
    for k, key in enumerate(ids):
        target = folder / ("a" if k % 2 else "b/c") / f"{key}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(images / f"{key}.jpg", target)
    (folder / "b" / "notes.txt").write_text("not an image")
    out2 = tmp_path / "folder.csv"
    assert predict_main(["--checkpoint", str(best), "--input", str(folder), "--out", str(out2)]) == 0
    check(list(csv.DictReader(open(out2))))


def checkpointed_steps_all_finite(run_dir) -> list[int]:
    """The steps of the run's checkpoints, after checking that every one of them holds finite weights only."""
    steps = []
    for path in sorted((run_dir / "checkpoints").glob("step-*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)["model"]
        assert all(torch.isfinite(t).all() for t in state.values()), path
        steps.append(int(path.stem.split("-")[1]))
    assert not list((run_dir / "checkpoints").glob(".*tmp*")), "a half-written checkpoint was left"
    return steps


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(shards, tmp_path):
    # Adam at lr 1e30: step 1 moves the weights by ~1e30 (finite), step 2's loss then overflows.
    cfg = load_config("smiling_simple_cnn", [*FAST, "train.epochs=3", "optim.lr=1e30", "train.sync_every_steps=1",
                                              "train.checkpoint_every_steps=1", "train.keep_last=100"],
                      data_dir=str(shards), run_dir=str(tmp_path / "nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at optimizer step \d+") as err:
        main(cfg)
    bad_step = int(re.search(r"optimizer step (\d+)", str(err.value)).group(1))
    assert bad_step >= 2
    # every step before the bad one was checkpointed (checkpoint_every_steps=1), and nothing after it
    assert checkpointed_steps_all_finite(tmp_path / "nan") == list(range(1, bad_step))


def test_non_finite_weights_with_a_finite_loss_are_not_checkpointed(shards, tmp_path):
    """The saver's own check, which the loss check cannot pre-empt: pretrained weights where one channel of the
    first conv has bias -inf. ReLU turns that channel into zeros, so the loss and the gradients stay finite and
    training goes on, but the weights are not finite and must never reach a checkpoint."""
    from celeba_dist.models import build_model

    weights = build_model("simple_cnn", num_attributes=1).state_dict()
    weights["features.0.bias"][0] = -math.inf
    torch.save(weights, tmp_path / "dead_channel.pt")
    run_dir = tmp_path / "inf"
    cfg = load_config("smiling_simple_cnn", [*FAST, "train.epochs=1", f"model.pretrained={tmp_path / 'dead_channel.pt'}",
                                              "train.sync_every_steps=1", "train.checkpoint_every_steps=3",
                                              "log.image_grid_size=0"],
                      data_dir=str(shards), run_dir=str(run_dir))
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights at optimizer step 3 \(the loss was finite\): "
                                                 r"weights \['features.0.bias'\] are not finite"):
        main(cfg)
    assert checkpointed_steps_all_finite(run_dir) == []
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, math.isfinite(e.value)) for e in acc.Scalars("train/loss")] == [(2, True)]  # the loss was fine


def loss_at(run_dir, step: int) -> float:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return next(e.value for e in acc.Scalars("train/loss") if e.step == step)


def test_accumulation_bf16_channels_last_ema_tta_and_tuned_thresholds(shards, tmp_path):
    from celeba_dist.train.checkpoint import step_path
    from celeba_dist.train.metrics import tuned_thresholds

    attributes = ["Smiling", "Male"]
    variants = [*FAST, "train.grad_accum_steps=4", "train.channels_last=true", "train.tune_thresholds=balanced_accuracy",
                "train.ema_decay=0.5", "eval.tta=flip",  # under bf16 autocast too
                f"data.attributes=[{', '.join(attributes)}]", "train.keep_last=5", "log.image_grid_size=0"]
    run_dir = tmp_path / "variants"
    # A process of its own: Accelerate's state (the precision) is set once per process.
    cmd = [sys.executable, "-m", "celeba_dist.train", "--config", "smiling_simple_cnn", "--data", str(shards),
           "--run-dir", str(run_dir), "--set", *variants, "train.epochs=2", "train.precision=bf16"]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    micro = manifest_count(shards, "train") // 16
    assert micro % 4, "each epoch should end with a shorter accumulation group"
    per_epoch = -(-micro // 4)  # optimizer steps: ceil(micro-batches / 4), the last group's step taken too
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [per_epoch, 2 * per_epoch]

    # The final test used the best epoch's checkpoint and the thresholds tuned on validation with its weights.
    best_path = run_dir / "checkpoints" / "best.pt"
    best = torch.load(best_path, map_location="cpu", weights_only=False)
    assert best["state"]["global_step"] == metrics["best_step"] == metrics["history"][metrics["best_epoch"]]["step"]
    assert os.path.samefile(best_path, step_path(run_dir / "checkpoints", metrics["best_step"]))  # a hard link
    scored = tmp_path / "scored.json"  # eval's scores of best.pt, in bf16 like the run: a process of its own
    probe = subprocess.run([sys.executable, str(Path(__file__).with_name("evalkit.py")), str(best_path), str(scored),
                            "val", "test"], env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    val, test = (json.loads(scored.read_text())[s] for s in ("val", "test"))
    tuned = tuned_thresholds(torch.tensor(val["probs"]), torch.tensor(val["targets"]), "balanced_accuracy").tolist()
    assert best["thresholds"] == tuned and tuned != [0.5, 0.5]
    assert metrics["thresholds"] == dict(zip(attributes, tuned))
    expected = compute_metrics(torch.tensor(test["probs"]), torch.tensor(test["targets"]), attributes,
                               torch.tensor(tuned))
    for name in attributes:  # decisions at validation's thresholds, unchanged: the same confusion counts
        counts = ("tp", "fp", "tn", "fn")
        assert [metrics["test"]["attributes"][name][k] for k in counts] == [expected["attributes"][name][k] for k in counts]

    # channels_last: the weights trained, and were checkpointed, in channels-last layout
    weight = best["model"]["features.0.weight"]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    # the EMA (train.ema_decay) was kept beside the trained weights under bf16, in their layout
    assert best["ema"].keys() == best["model"].keys() and best["ema_updates"] == best["state"]["global_step"]
    assert best["ema"]["features.0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(best["ema"]["features.0.weight"], weight)
    # bf16: the same first two steps in fp32 (same seed, same batches) give a close but different loss
    assert json.loads((run_dir / "env.json").read_text())["mixed_precision"] == "bf16"
    fp32 = tmp_path / "fp32"
    main(load_config("smiling_simple_cnn", [*variants, "train.max_steps=2", "train.precision=no"],
                     data_dir=str(shards), run_dir=str(fp32)))
    assert loss_at(run_dir, 2) != loss_at(fp32, 2)
    assert loss_at(run_dir, 2) == pytest.approx(loss_at(fp32, 2), abs=0.05)


def test_attention_model_draws_its_attention_in_tensorboard(shards, tmp_path):
    # ResNet-18 + BiLSTM + attention at 64x64 (a 2x2 region map) keeps this fast on a CPU
    cfg = load_config("male_resnet18_lstm_attn", [*FAST, "train.epochs=1", "model.pretrained=none",
                                                   "data.image_size=[64, 64]", "log.image_grid_size=4"],
                      data_dir=str(shards), run_dir=str(tmp_path / "attn"))
    assert main(cfg)["status"] == "completed"
    acc = EventAccumulator(str(tmp_path / "attn" / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert {"val/attention", "val/predictions", "val/attribute_accuracy"} <= set(acc.Tags()["images"])
    # The picture is the model's own attention over the first validation images, drawn with the weights of the
    # epoch end (the only epoch: best.pt), pixel for pixel.
    ckpt = load_checkpoint(tmp_path / "attn" / "checkpoints" / "best.pt")
    run_cfg = config_from_tree(ckpt["config"], ["model.pretrained=none"])
    transform = build_transform(run_cfg.data.transform, image_size=run_cfg.data.image_size, train=False)
    stream = eval_stream(ShardData(str(shards), ckpt["attributes"]), "val", transform, batch_size=4, rank=0, world_size=1)
    images, labels, *_ = next(iter(stream))
    model = build_model_for(run_cfg, len(ckpt["attributes"])).eval()
    model.load_state_dict(ckpt["model"])
    x, _ = prepare_batch(images, labels, device=torch.device("cpu"), normalize=run_cfg.data.normalize,
                         channels_last=run_cfg.train.channels_last)
    with torch.no_grad():
        _, attention = model(x, return_attention=True)
    drawn = np.asarray(Image.open(io.BytesIO(acc.Images("val/attention")[-1].encoded_image_string)).convert("RGB"))
    expected = attention_overlay(images, attention)
    assert drawn.shape == expected.shape == (66, 4 * 66, 3)  # four 64x64 tiles with their 2-pixel borders
    assert np.array_equal(drawn, expected)  # PNG is lossless
    uniform = attention_overlay(images, torch.full_like(attention, 1 / attention.shape[-1]))
    assert not np.array_equal(drawn, uniform)  # after one epoch the 2x2 attention is close to uniform, not equal


def test_train_command_exits_1_on_bad_input(shards, tmp_path, capsys):
    from celeba_dist.train.main import cli_main

    base = ["--config", "smiling_simple_cnn", "--run-dir", str(tmp_path / "run")]
    assert cli_main([*base, "--data", str(shards), "--set", "optim.lrr=1"]) == 1
    assert "unknown key optim.lrr" in capsys.readouterr().err
    assert cli_main([*base, "--data", str(tmp_path / "no_shards"), "--set", *FAST]) == 1
    assert "no_shards" in capsys.readouterr().err
    if not torch.cuda.is_available():  # fp16 on the CPU is refused, not trained in another precision without a word
        assert cli_main([*base, "--data", str(shards), "--set", *FAST, "train.max_steps=1", "train.precision=fp16"]) == 1
        assert "train.precision=fp16 needs a GPU; use bf16 or no on the CPU" in capsys.readouterr().err
        assert not list_checkpoints(tmp_path / "run" / "checkpoints")


def test_clip_grad_norm_bounds_the_step(shards, tmp_path):
    """One step of plain SGD at lr 1 from known weights moves them by the clipped gradient: norm clip_grad_norm."""
    from celeba_dist.models import build_model

    start = build_model("simple_cnn", num_attributes=1).state_dict()
    torch.save(start, tmp_path / "start.pt")
    run_dir = tmp_path / "clip"
    cfg = load_config("smiling_simple_cnn", [*FAST, "train.max_steps=1", "optim.name=sgd", "optim.lr=1.0",
                                              "optim.momentum=0.0", "optim.weight_decay=0.0", "train.clip_grad_norm=0.001",
                                              f"model.pretrained={tmp_path / 'start.pt'}", "log.image_grid_size=0",
                                              "train.eval_splits=[val]"],
                      data_dir=str(shards), run_dir=str(run_dir))
    assert main(cfg)["global_step"] == 1
    end = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[0])["model"]
    moved = math.sqrt(sum(float(((end[k].double() - start[k].double()) ** 2).sum()) for k in start))
    assert moved == pytest.approx(0.001, rel=1e-3)  # unclipped, the gradient's norm is far larger


def test_grad_accumulation_takes_the_step_of_the_whole_batch(shards, tmp_path):
    """Two micro-batches of 8 accumulated take the step one batch of the same 16 images takes: plain SGD at lr 1
    from the same weights (no dropout) moves them by the same gradient, the mean over the 16, not by twice it."""
    from celeba_dist.models import build_model

    start = build_model("simple_cnn", num_attributes=1, dropout=0.0).state_dict()
    torch.save(start, tmp_path / "start.pt")
    base = [*FAST, "data.num_workers=0", "train.max_steps=1", "optim.name=sgd", "optim.lr=1.0", "optim.momentum=0.0",
            "model.dropout=0.0", f"model.pretrained={tmp_path / 'start.pt'}", "log.image_grid_size=0",
            "train.eval_splits=[val]"]
    moved = {}
    for name, extra in {"whole": ["data.batch_size=16"], "accumulated": ["data.batch_size=8", "train.grad_accum_steps=2"]}.items():
        run_dir = tmp_path / name
        assert main(load_config("smiling_simple_cnn", [*base, *extra], data_dir=str(shards), run_dir=str(run_dir)))["global_step"] == 1
        end = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[0])["model"]
        moved[name] = {k: end[k] - start[k] for k in start}
    for k in start:
        assert moved["whole"][k].abs().max() > 0, k
        torch.testing.assert_close(moved["accumulated"][k], moved["whole"][k], rtol=1e-4, atol=1e-7)


def test_best_checkpoint_is_the_epoch_with_the_best_validation(trained):
    """best_epoch, best.pt and the final test follow train.select_metric's highest validation value (the first
    epoch that reached it), whichever epoch that was."""
    run_dir, result = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    values = [h["val"]["accuracy"] for h in metrics["history"]]
    best = values.index(max(values))
    assert metrics["best_epoch"] == result["best"]["epoch"] == best
    assert metrics["select_metric_value"] == max(values)
    assert metrics["best_step"] == metrics["history"][best]["step"]
    assert load_checkpoint(run_dir / "checkpoints" / "best.pt")["state"]["global_step"] == metrics["best_step"]


def last_run_log(run_dir) -> str:
    """The lines of the run folder's latest run (a run's first line is its model's 'built ...')."""
    runs = re.split(r"celeba_dist\.models[.\w]*: built ", (run_dir / "logs" / "rank0.log").read_text())
    assert len(runs) > 1, "no run's first line in the log"
    return runs[-1]


def test_resume_from_a_given_checkpoint_or_from_none(trained, shards, tmp_path):
    import shutil

    from celeba_dist.train.main import cli_main

    run_dir, _ = trained
    copy = tmp_path / "copy"  # the fixture's run stays as it is
    shutil.copytree(run_dir, copy)
    args = ["--config", "smiling_simple_cnn", "--data", str(shards), "--run-dir", str(copy), "--set", *FAST,
            "train.epochs=2", "data.attributes=[Smiling, Male, Eyeglasses]", "log.image_grid_size=0"]
    older = list_checkpoints(copy / "checkpoints")[-1]  # not the newest: auto would not pick it
    spe, step = manifest_count(shards, "train") // 16, step_of(older)
    # --resume FILE: continues from that file's step and trains only what is left
    assert cli_main([*args, "--resume", str(older)]) == 0
    log = last_run_log(copy)
    assert f"resumed from {older}: epoch {step // spe}, batch {step % spe} of the epoch, step {step}" in log
    assert re.findall(r"checkpoint (step-\d+)\.pt \(", log) == [f"step-{2 * spe:09d}"]
    # --resume FILE into a new folder: the source run's best.pt comes along, the run finishes there
    elsewhere = tmp_path / "elsewhere"
    assert cli_main([*args[:5], str(elsewhere), *args[6:], "--resume", str(older)]) == 0
    assert (elsewhere / "checkpoints" / "best.pt").is_file() and (elsewhere / "metrics.json").is_file()
    # ... and stays the best unless a later epoch beats it: the best so far (epoch 0's) lies before the resume point
    before, after = load_checkpoint(older)["state"], json.loads((elsewhere / "metrics.json").read_text())
    assert before["best_step"] <= spe < step
    assert after["select_metric_value"] == max(before["best_metric"], after["history"][-1]["val"]["accuracy"])
    assert load_checkpoint(elsewhere / "checkpoints" / "best.pt")["state"]["global_step"] == after["best_step"]
    # --resume none over a folder with checkpoints would mix two runs: refused, nothing touched
    before = sorted(p.name for p in (copy / "checkpoints").iterdir())
    assert cli_main([*args, "train.max_steps=3", "--resume", "none"]) == 1
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == before
    # --resume none in a fresh folder trains from step 0
    fresh = tmp_path / "fresh"
    assert cli_main([*args[:5], str(fresh), *args[6:], "train.max_steps=3", "--resume", "none"]) == 0
    log = last_run_log(fresh)
    assert "resumed from" not in log and "run " in log
    assert [h["step"] for h in json.loads((fresh / "metrics.json").read_text())["history"]] == [3]


def test_random_sweep_members_each_have_their_own_hparams(shards, tmp_path):
    """``sweep --random`` through submitit's local executor: each member a run of its own with its drawn value in
    its own HParams entry (the SLURM job array is tested in test_slurm_cluster.py)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    from celeba_dist.launch.sweep import random_members

    sweep = tmp_path / "rand"
    drawn = ["--random", "2", "--range", "optim.lr=1e-4:1e-2:log", "--seed", "3"]
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "jobs" / "sweep.py"), "--config",
           "smiling_simple_cnn", "--data", str(shards), "--run-dir", str(sweep), *drawn, "--local", "--wait",
           "--gpus-per-node", "0", "--set", *FAST, "train.max_steps=2", "log.image_grid_size=0"]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((sweep / "sweep.json").read_text())
    expected = random_members("smiling_simple_cnn", 2, ["optim.lr=1e-4:1e-2:log"], seed=3)
    assert record["mode"] == "random" and [m["overrides"] for m in record["members"]] == [m.overrides for m in expected]
    lrs = [float(m.overrides[0].split("=")[1]) for m in expected]
    assert lrs[0] != lrs[1]
    for member, lr in zip(record["members"], lrs):
        acc = EventAccumulator(str(Path(member["run_dir"]) / "tensorboard"), size_guidance={"tensors": 0})
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["optim.lr"].number_value == pytest.approx(lr)
        assert "hparam/test_accuracy" in acc.Tags()["scalars"]


def test_demo_stops_at_a_failed_pack_saying_why_once(tmp_path):
    """A data folder the packer refuses (here an empty list_attr_celeba.txt): the demo ends with the packer's own
    error, not by training on shards that were never written ("no manifest, pack the data first")."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "list_attr_celeba.txt").write_text("")  # present, so the demo does not make the synthetic set
    proc = subprocess.run([sys.executable, "-m", "celeba_dist", "demo", "--data-dir", str(data), "--shards",
                           str(tmp_path / "shards"), "--run-dir", str(tmp_path / "run")], env=cpu_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["celeba-dist pack: error: list_attr_celeba.txt line 1: expected the number of images, got "
                      "'an empty file'"], proc.stderr[-3000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "shards" / "manifest.json").exists()


def test_demo_runs_end_to_end(tmp_path):
    """The README's first command, small: synthetic data -> shards -> train -> test table. A bad override
    fails first, in one line, before any data is made."""
    args = ["-m", "celeba_dist", "demo", "--data-dir", str(tmp_path / "data"), "--shards", str(tmp_path / "shards"),
            "--run-dir", str(tmp_path / "run"), "--num-images", "240", "--epochs", "1",
            "--set", "data.batch_size=16", "log.progress_bar=false"]
    proc = subprocess.run([sys.executable, *args, "optim.lr=abc"], env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == \
        "celeba-dist demo: error: optim.lr: expected a number, got 'abc'", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, *args], env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tensorboard --logdir" in proc.stdout and "Smiling" in proc.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["mean"]["num_samples"] == manifest_count(tmp_path / "shards", "test")
