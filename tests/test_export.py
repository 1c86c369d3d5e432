"""``celeba-dist export`` and ``celeba_dist.load`` on a real trained run: the folder a Hub user expects,
the same probabilities as ``predict``, a model card whose metrics are metrics.json's, and tampered or
occupied inputs refused with nothing written."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import celeba_dist
from celeba_dist.data.streams import ShardData, read_part
from celeba_dist.train.metrics import METRICS
from test_resume import _RunsCode
from test_train import cpu_env


@pytest.fixture(scope="module")
def run(pristine, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("export") / "run"
    cmd = [sys.executable, "-m", "celeba_dist", "train", "--config", "smiling_simple_cnn", "--data", str(pristine),
           "--run-dir", str(run_dir), "--set", "data.attributes=[Smiling, Male, Eyeglasses]", "train.epochs=2",
           "data.batch_size=16", "data.image_size=[32, 32]", "data.num_workers=0", "log.progress_bar=false",
           "train.tune_thresholds=accuracy"]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "celeba_dist", *args], env=cpu_env(), capture_output=True,
                          text=True, timeout=timeout)


def read_csv(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    probs = [i for i, name in enumerate(header) if name.endswith("_prob")]
    return {row[0]: [float(row[i]) for i in probs] for row in rows[1:]}


def test_export_folder_loads_and_predicts_like_the_run(run, pristine, tmp_path):
    out = tmp_path / "export"
    proc = cli("export", str(run), str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "accuracy.png", "config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    best = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert meta["attributes"] == ["Smiling", "Male", "Eyeglasses"] == best["attributes"]
    assert meta["thresholds"] == pytest.approx(best["thresholds"]) and meta["thresholds"] != [0.5] * 3
    assert meta["input_size"] == [32, 32] and meta["normalize"] == "unit" and meta["model"]["name"] == "simple_cnn"
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    assert weights.keys() == best["model"].keys()
    assert all(torch.equal(weights[k], best["model"][k]) for k in weights)

    # predict from the export, the run and the checkpoint: one CSV, whichever the source
    csvs = {}
    for name, flag, source in (("export", "--model", out), ("run", "--model", run),
                               ("checkpoint", "--checkpoint", run / "checkpoints" / "best.pt")):
        csvs[name] = tmp_path / f"{name}.csv"
        proc = cli("predict", flag, str(source), "--input", str(pristine), "--split", "test", "--out",
                   str(csvs[name]))
        assert proc.returncode == 0, proc.stderr[-2000:]
    predicted = read_csv(csvs["export"])
    assert predicted == read_csv(csvs["run"]) == read_csv(csvs["checkpoint"])
    assert len(predicted) == ShardData(str(pristine)).split("test").num_samples

    # load(): the same probabilities from the image bytes, through its own preprocess
    model, preprocess = celeba_dist.load(out)
    assert not model.training and model.attributes == meta["attributes"]
    data = ShardData(str(pristine))
    samples = [s for path, n in data.split("test").shards for s in read_part(_part(path, n))]
    with torch.no_grad():
        probs = model(preprocess([bytes(s["jpg"]) for s in samples]))
    for sample, row in zip(samples, probs.tolist()):
        assert row == pytest.approx(predicted[sample["__key__"]], abs=1e-6)
    run_model, _ = celeba_dist.load(run)  # a run folder loads the same weights
    with torch.no_grad():
        assert torch.allclose(run_model(preprocess([bytes(samples[0]["jpg"])])), probs[:1])


def _part(path: str, n: int):
    from celeba_dist.data.streams import ShardPart

    return ShardPart(path, limit=n)


def test_model_card_metrics_are_the_runs(run, tmp_path):
    out = tmp_path / "export"
    assert cli("export", str(run / "checkpoints" / "best.pt"), str(out)).returncode == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: celeba-dist\n") and "- celeba\n" in card
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        section = card.split(f"### {split} (")[1].split("\n\n", 2)[1]
        rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:]
                for line in section.splitlines()[2:]}
        for name, values in metrics[split]["attributes"].items():
            assert rows[name] == [f"{values[m]:.4f}" if values[m] is not None else "n/a" for m in METRICS], name
    data = json.loads((run / "data.json").read_text())
    assert data["manifest_sha256"] in card and "![accuracy per attribute](accuracy.png)" in card
    assert "Intended use and limitations" in card and "identifying people" in card


def test_model_card_of_another_checkpoint_says_its_weights_were_not_evaluated(run, tmp_path):
    """metrics.json describes best.pt only: the card of any other step has no tables, no chart, and says how
    to evaluate it; the best step's own file (not best.pt) keeps the metrics."""
    metrics = json.loads((run / "metrics.json").read_text())
    steps = {int(p.stem.split("-")[1]): p for p in (run / "checkpoints").glob("step-*.pt")}
    other = next(p for step, p in steps.items() if step != metrics["best_step"])
    out = tmp_path / "other"
    assert cli("export", str(other), str(out)).returncode == 0
    card = (out / "README.md").read_text()
    assert "### val" not in card and "### test" not in card and "Best epoch" not in card
    assert f"These weights (step {int(other.stem.split('-')[1])}) were not evaluated" in card
    assert f"describes its best checkpoint (step {metrics['best_step']}, epoch {metrics['best_epoch']})" in card
    assert f"`celeba-dist eval --checkpoint {other} --split test`" in card
    assert not (out / "accuracy.png").exists()
    assert json.loads((out / "config.json").read_text())["step"] == int(other.stem.split("-")[1])
    best_step = tmp_path / "best-step"
    assert cli("export", str(steps[metrics["best_step"]]), str(best_step)).returncode == 0
    assert "### test (" in (best_step / "README.md").read_text() and (best_step / "accuracy.png").is_file()


def test_export_refuses_a_tampered_checkpoint_and_an_occupied_folder(run, tmp_path):
    best = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    marker = tmp_path / "code-ran"
    tampered = tmp_path / "tampered.pt"
    torch.save({**best, "thresholds": _RunsCode(marker)}, tampered)
    started = time.monotonic()
    proc = cli("export", str(tampered), str(tmp_path / "out"))
    assert proc.returncode == 1 and time.monotonic() - started < 60
    assert f"checkpoint {tampered} refused" in proc.stderr.strip().splitlines()[-1]
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary folder left
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    proc = cli("export", str(run), str(occupied))
    assert proc.returncode == 1 and "not an empty folder" in proc.stderr
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]


def test_onnx_export_matches_pytorch_and_a_mismatch_keeps_nothing(run, pristine, tmp_path, monkeypatch):
    out = tmp_path / "onnx"
    proc = cli("export", str(run), str(out), "--onnx")
    assert proc.returncode == 0, proc.stderr[-2000:]
    reported = float(proc.stdout.split("max abs difference of probabilities ")[1].split()[0])
    assert reported < 1e-4
    meta = json.loads((out / "config.json").read_text())
    assert meta["onnx"]["max_abs_diff_vs_pytorch"] == pytest.approx(reported, rel=0.01, abs=1e-12)
    # our own check, on real images and another batch size than the export's
    import onnxruntime

    model, preprocess = celeba_dist.load(out)
    data = ShardData(str(pristine))
    path, n = data.split("val").shards[0]
    images = preprocess([bytes(s["jpg"]) for s in read_part(_part(path, n))])
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        assert float((torch.from_numpy(got) - model(images)).abs().max()) < 1e-4
    assert got.shape == (n, 3)
    # a mismatch fails loudly and leaves no folder
    from celeba_dist.export import cli as export_cli
    from celeba_dist.export import onnx as export_onnx

    monkeypatch.setattr(export_onnx, "TOLERANCE", 0.0)
    with pytest.raises(export_onnx.OnnxMismatchError, match="differ from PyTorch's"):
        export_cli.export(run, tmp_path / "bad", onnx=True)
    assert not (tmp_path / "bad").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".bad.")]  # nor the folder it was filling


def read_decisions(path: Path) -> dict[str, list[int]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    decided = [i for i, name in enumerate(rows[0][1:], 1) if not name.endswith("_prob")]
    return {row[0]: [int(row[i]) for i in decided] for row in rows[1:]}


def test_decisions_use_the_runs_tuned_thresholds_from_every_source(run, pristine, tmp_path):
    """The CSV's 0/1 columns are probability >= the run's tuned threshold (not 0.5), whether predict reads
    the export, the run or the checkpoint; and the export's loaded classifier decides with the same thresholds."""
    out = tmp_path / "export"
    assert cli("export", str(run), str(out)).returncode == 0
    thresholds = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)["thresholds"]
    decisions = {}
    for name, flag, source in (("export", "--model", out), ("checkpoint", "--checkpoint", run / "checkpoints" / "best.pt")):
        path = tmp_path / f"{name}.csv"
        proc = cli("predict", flag, str(source), "--input", str(pristine), "--out", str(path))
        assert proc.returncode == 0, proc.stderr[-2000:]
        probs, decisions[name] = read_csv(path), read_decisions(path)
        for key, row in probs.items():  # the CSV rounds to 1e-6; a tuned threshold is a validation image's score
            assert [d for d, p, t in zip(decisions[name][key], row, thresholds) if abs(p - t) > 1e-6] == [
                int(p >= t) for p, t in zip(row, thresholds) if abs(p - t) > 1e-6], key
    assert decisions["export"] == decisions["checkpoint"]
    data = ShardData(str(pristine))  # a shards folder without --split: one row for every image of every split
    assert len(probs) == sum(data.split(s).num_samples for s in ("train", "val", "test")) == 300
    at_half = {key: [int(p >= 0.5) for p in row] for key, row in probs.items()}
    assert decisions["export"] != at_half  # the tuned thresholds decide some images otherwise than 0.5 would
    model, _ = celeba_dist.load(out)
    assert model.thresholds.tolist() == pytest.approx(thresholds)
    probs_tensor = torch.tensor([[0.5] * 3, thresholds])
    assert model.decide(probs_tensor)[1].tolist() == [1, 1, 1]
