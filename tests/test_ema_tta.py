"""The recipes' modern parts: an EMA of the weights (train.ema_decay) and flip test-time augmentation
(eval.tta=flip), each against a hand computation, and through the real run, eval, predict and export."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from celeba_dist.config import ConfigError, load_config
from celeba_dist.evaluate import evaluate_checkpoint
from celeba_dist.export.cli import export
from celeba_dist.export.loading import build_classifier, read_trained
from celeba_dist.train.checkpoint import load_checkpoint
from celeba_dist.train.ema import WeightEMA
from celeba_dist.train.engine import predict_probs
from celeba_dist.train.main import main
from shardkit import synthetic_shards
from test_train import FAST


class TinyNet(torch.nn.Module):
    """A linear layer and a BatchNorm: parameters and running-statistics buffers."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.bn = torch.nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.fc(x))


def float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def train_steps(model: torch.nn.Module, ema: WeightEMA, steps: int) -> list[dict[str, torch.Tensor]]:
    """SGD steps on random data, the EMA updated after each (as the engine does); the weights after each step."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    history = []
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        loss = (model(x) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        history.append(float_state(model))
    return history


def test_ema_with_decay_zero_is_the_raw_weights():
    torch.manual_seed(0)
    model = TinyNet()
    ema = WeightEMA(model, decay=0.0)
    train_steps(model, ema, 5)
    raw, averaged = float_state(model), float_state(ema.module)
    assert raw.keys() == averaged.keys() and "bn.running_mean" in raw
    assert all(torch.equal(raw[k], averaged[k]) for k in raw)


def test_ema_equals_a_hand_computed_average_of_the_weight_history():
    torch.manual_seed(0)
    model = TinyNet()
    decay = 0.7
    ema = WeightEMA(model, decay=decay)
    history = train_steps(model, ema, 6)
    expected = dict(history[0])  # the first update copies the weights
    for weights in history[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    got = float_state(ema.module)
    for k in expected:  # parameters and BatchNorm's running statistics alike
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)
    assert not torch.allclose(got["fc.weight"], history[-1]["fc.weight"])  # an average, not the last weights
    assert ema.updates == 6


def test_ema_state_round_trips_through_a_checkpoint_dict():
    torch.manual_seed(0)
    model = TinyNet()
    ema = WeightEMA(model, decay=0.9)
    train_steps(model, ema, 3)
    saved = ema.state_dict()
    other = WeightEMA(TinyNet(), decay=0.9)
    assert other.load_state_dict(saved) and other.updates == 3
    assert all(torch.equal(a, b) for a, b in zip(float_state(other.module).values(), float_state(ema.module).values()))
    assert not WeightEMA(TinyNet(), decay=0.9).load_state_dict({"ema": None})  # a checkpoint without an EMA


def test_ema_decay_outside_the_unit_interval_names_the_key():
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config("smiling_simple_cnn", ["train.ema_decay=1.0"])
    with pytest.raises(ConfigError, match="eval.tta"):
        load_config("smiling_simple_cnn", ["eval.tta=rotate"])


class MirrorSymmetric(torch.nn.Module):
    """Flip-invariant by construction: it only ever sees x + flip(x), which a horizontal flip leaves unchanged
    bit for bit (elementwise addition commutes exactly)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3)
        self.fc = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.conv(x + x.flip(3)).amax(dim=(2, 3)))


def test_flip_tta_changes_nothing_for_a_flip_invariant_model_and_averages_otherwise():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8, 8)
    sym = MirrorSymmetric().eval()
    assert torch.equal(predict_probs(sym, x, torch.sigmoid, tta="flip"), predict_probs(sym, x, torch.sigmoid))
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)).eval()
    flip = predict_probs(plain, x, torch.sigmoid, tta="flip")
    by_hand = (torch.sigmoid(plain(x)) + torch.sigmoid(plain(x.flip(3)))) / 2
    torch.testing.assert_close(flip, by_hand)
    assert not torch.allclose(flip, torch.sigmoid(plain(x)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("ema"), num_images=300, samples_per_shard=16)


@pytest.fixture(scope="module")
def ema_run(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ema_run") / "run"
    cfg = load_config("smiling_simple_cnn", [*FAST, "train.epochs=3", "train.ema_decay=0.8", "eval.tta=flip",
                                             "train.tune_thresholds=accuracy", "log.image_grid_size=4",
                                             "data.attributes=[Smiling, Male]"],
                      data_dir=str(shards), run_dir=str(run_dir))
    return run_dir, main(cfg)


def test_a_run_validates_raw_and_ema_weights_and_keeps_the_better(ema_run):
    run_dir, result = ema_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for entry in metrics["history"]:
        assert {"val", "val_ema", "weights"} <= set(entry)
        chosen = entry["val_ema"] if entry["weights"] == "ema" else entry["val"]
        other = entry["val"] if entry["weights"] == "ema" else entry["val_ema"]
        assert chosen["accuracy"] >= other["accuracy"]
        assert entry["weights"] == "raw" or chosen["accuracy"] > other["accuracy"]  # a tie keeps the raw weights
    best = metrics["history"][metrics["best_epoch"]]
    assert metrics["weights"] == best["weights"]
    assert metrics["select_metric_value"] == (best["val_ema"] if best["weights"] == "ema" else best["val"])["accuracy"]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert ckpt["weights"] == metrics["weights"] and ckpt["ema"].keys() == ckpt["model"].keys()
    assert ckpt["ema_updates"] == ckpt["state"]["global_step"]
    # both curves are in TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert {"val/accuracy", "val_ema/accuracy"} <= set(acc.Tags()["scalars"])


def test_eval_predict_and_export_use_the_selected_weights_and_tta(ema_run, shards, tmp_path):
    run_dir, result = ema_run
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    for weights in ("ema", "raw"):  # whichever validation chose, eval and export follow the checkpoint's choice
        ckpt = {**best, "weights": weights}
        path = tmp_path / f"{weights}.pt"
        torch.save(ckpt, path)
        trained = read_trained(path)
        expected = best["ema"] if weights == "ema" else best["model"]
        assert all(torch.equal(trained.state_dict[k], expected[k]) for k in expected)
        assert trained.weights == weights
    # eval on the run's own best.pt gives the run's own test metrics (same weights, thresholds and TTA)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    again = evaluate_checkpoint(run_dir / "checkpoints" / "best.pt", split="test", data_dir=None, overrides=[])
    assert again["attributes"] == metrics["test"]["attributes"]
    no_tta = evaluate_checkpoint(run_dir / "checkpoints" / "best.pt", split="test", data_dir=None,
                                 overrides=["eval.tta=none"])
    assert no_tta["mean"]["auroc"] != again["mean"]["auroc"]  # the flip really took part
    # the export keeps the selected weights and the run's TTA: its classifier averages with the mirror
    out = export(run_dir, tmp_path / "export")
    meta = json.loads((out / "config.json").read_text())
    assert meta["weights"] == metrics["weights"] and meta["tta"] == "flip"
    classifier = build_classifier(read_trained(out))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        net = classifier.net
        torch.testing.assert_close(classifier(x), (torch.sigmoid(net(x)) + torch.sigmoid(net(x.flip(3)))) / 2)
    assert "mirrored image" in (out / "README.md").read_text()


def test_eval_and_the_card_follow_the_checkpoints_weights_choice(ema_run, tmp_path):
    """Whichever weights a checkpoint names (raw or EMA), `eval` scores those; and the run's metrics.json only
    describes the export of the very weights it evaluated, not the other half of the same step."""
    run_dir, _ = ema_run
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert any(not torch.equal(best["ema"][k], best["model"][k]) for k in best["model"])  # two different models
    paths = {}
    for name, ckpt in (("ema", {**best, "weights": "ema"}), ("raw", {**best, "weights": "raw"}),
                       ("ema_as_raw", {**best, "model": best["ema"], "weights": "raw"})):
        paths[name] = tmp_path / "checkpoints" / f"{name}.pt"
        paths[name].parent.mkdir(exist_ok=True)
        torch.save(ckpt, paths[name])
    scored = {name: evaluate_checkpoint(path, split="val", data_dir=None, overrides=["eval.tta=none"])
              for name, path in paths.items()}
    assert scored["ema"]["attributes"] == scored["ema_as_raw"]["attributes"]
    assert scored["ema"]["mean"]["auroc"] != scored["raw"]["mean"]["auroc"]
    # the card: metrics.json evaluated best.pt's choice; the same step's other weights were not evaluated
    metrics = json.loads((run_dir / "metrics.json").read_text())
    other = "raw" if metrics["weights"] == "ema" else "ema"
    shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("tensorboard", "logs"))
    swapped = tmp_path / "run" / "checkpoints" / "other.pt"
    torch.save({**best, "weights": other}, swapped)
    card = (export(swapped, tmp_path / "export") / "README.md").read_text()
    assert "were not evaluated" in card and "### test" not in card
