"""The one GPU command works before a GPU is lent: ``tools/bench_gpu.py`` on the CPU, tiny.

A GPU session has minutes of device time for every GPU figure, so the script must not first fail there
on a renamed scalar, log line or option. This runs the real script (every model under every cache, and
the headline) and checks each figure it reports is read from its runs: TensorBoard's scalars, the log's
cache-fill line, metrics.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from celeba_dist.synthetic.labels import split_counts
from test_train import cpu_env

REPO = Path(__file__).resolve().parents[1]
MODELS = ["simple_cnn", "celeb_cnn", "resnext50_32x4d", "resnet18_lstm_attn"]
CACHES = ["none", "host", "device", "device-decode"]


@pytest.mark.slow
def test_bench_gpu_runs_every_model_cache_and_the_headline_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "tools" / "bench_gpu.py"), "--work-dir", str(tmp_path / "work"),
           "--num-images", "100", "--steps", "3", "--log-every", "1", "--batch-size", "4", "--workers", "1",
           "--precision", "no", "--no-channels-last", "--caches", *CACHES, "--headline", "--headline-images", "200",
           "--headline-epochs", "2", "--headline-batch", "16", "--out", str(out)]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "no GPU" in report["machine"] and "cores" in report["machine"]

    rows = {(r["model"], r["cache"]): r for r in report["rows"]}
    assert sorted(rows) == sorted((m, c) for m in MODELS for c in CACHES)
    for (model, cache), r in rows.items():
        assert r["batch"] == 4 and r["img_s"] > 0, r  # from train/images_per_s, the warm-up window left out
        assert 0 <= r["data_wait"] <= 1, r
        assert (r["fill_s"] is None) == (cache == "none"), r  # the "cache: ... in Xs" log line
        assert cache == "none" or r["fill_s"] > 0, r
        assert r["peak_gib"] == 0.0 and len(r["epoch_s"]) == 1, r
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + len(rows), proc.stdout  # the header and a row per run

    head = report["headline"]
    manifest = json.loads((tmp_path / "work" / "shards-200" / "manifest.json").read_text())
    assert head["train_images"] == manifest["splits"]["train"]["num_samples"] == split_counts(200)[0]
    assert head["epochs"] == 2 and head["batch"] == 16 and head["lr"] == pytest.approx(0.008 * 16 / 512)
    assert head["fill_s"] > 0 and 0 < head["train_s"] <= head["total_s"]
    assert 0 <= head["test_smiling_accuracy"] <= 1 and 0 <= head["test_mean_accuracy"] <= 1

    verdicts = report["verdicts"]
    assert len(verdicts) == len(MODELS) + 1 + 3, verdicts  # data wait per model, the speed-up, the headline's 3
    assert all(v.endswith(("met)", "MISSED)")) for v in verdicts if not v.startswith("headline training")), verdicts
    assert next(v for v in verdicts if v.startswith("headline training")).endswith("not judged)")  # 2 epochs
    wait = next(v for v in verdicts if v.startswith("data wait, simple_cnn"))
    assert f"{rows['simple_cnn', 'device']['data_wait']:.3f}" in wait
    assert "\n".join(["targets:", *verdicts]) in proc.stdout


def test_a_run_that_fails_is_a_row_with_its_error_and_the_others_are_still_measured(tmp_path):
    """On a GPU machine a carried TorchCodec may lack CUDA decoding: that row fails, the rest of the one
    device call still measures its rows, and the exit status says a row failed."""
    shadow = tmp_path / "shadow"  # a torchcodec that imports no decoder, first on the path
    shadow.mkdir()
    (shadow / "torchcodec.py").write_text('raise ImportError("this torchcodec build has no JPEG decoder")\n')
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "tools" / "bench_gpu.py"), "--work-dir", str(tmp_path / "work"),
           "--num-images", "100", "--steps", "3", "--log-every", "1", "--batch-size", "4", "--workers", "1",
           "--precision", "no", "--no-channels-last", "--models", "simple_cnn", "--caches", "device-decode", "none",
           "--out", str(out)]
    env = {**cpu_env(), "PYTHONPATH": os.pathsep.join([str(shadow), str(REPO)])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["cache"]: r for r in json.loads(out.read_text())["rows"]}
    assert "this torchcodec build has no JPEG decoder" in rows["device-decode"]["error"], rows
    assert rows["device-decode"]["img_s"] is None and "error" not in rows["none"] and rows["none"]["img_s"] > 0
    assert "| simple_cnn | 4 | device-decode | failed: " in proc.stdout
    assert "targets:" in proc.stdout and "Traceback" not in proc.stdout
