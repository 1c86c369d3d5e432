"""Configuration: every recipe validates, overrides apply with types, bad configs name the key."""
from __future__ import annotations

import re

import pytest
import yaml

from celeba_dist.config import ConfigError, load_config, shipped_recipes

EXPECTED_RECIPES = {"smiling_simple_cnn", "attrs40_celeb_cnn", "attrs40_resnext50", "male_resnet18_lstm_attn", "best_40attr",
                    "best_40attr_balanced"}


def test_shipped_recipes_all_validate():
    assert EXPECTED_RECIPES <= set(shipped_recipes())
    for name in shipped_recipes():
        cfg = load_config(name)
        assert cfg.run.name == name
        assert cfg.data.batch_size >= 1


def test_recipe_values_and_defaults_merge():
    cfg = load_config("attrs40_resnext50")
    assert cfg.model.name == "resnext50_32x4d"
    assert cfg.model.options == {"freeze_children": 6}
    assert cfg.loss.name == "mse_pm1" and cfg.optim.name == "adamax" and cfg.train.epochs == 12
    assert cfg.data.image_size == (218, 178)
    assert cfg.train.log_every_steps == 50  # from the defaults


def test_dotted_overrides_are_typed(tmp_path):
    cfg = load_config("smiling_simple_cnn", ["optim.lr=3e-4", "data.batch_size=64", "data.attributes=[Smiling, Male]",
                                              "train.precision=bf16", "data.image_size=[32, 32]"],
                      data_dir=str(tmp_path), run_dir=str(tmp_path / "run"))
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 64
    assert cfg.data.attributes == ["Smiling", "Male"]
    assert cfg.data.image_size == (32, 32)
    assert load_config("smiling_simple_cnn", ["train.precision=no", "train.compile=no"]).train.precision == "no"
    assert cfg.data.root == str(tmp_path)
    assert cfg.run_dir == tmp_path / "run"


def test_config_file_and_model_options(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "simple_cnn", "dropout": 0.25}, "train": {"epochs": 2}}))
    cfg = load_config(str(path))
    assert cfg.model.options == {"dropout": 0.25}
    assert cfg.run.name == "mine"


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], "unknown key optim.lrr"),
    (["nosuch.key=1"], "unknown section"),
    (["data.batch_size=abc"], "data.batch_size: expected an integer"),
    (["train.precision=fp8"], "train.precision"),
    (["model.name=resnet9000"], "model.name"),
    (["optim.name=lion"], "optim.name: unknown choice 'lion'"),
    (["sched.name=warp"], "sched.name"),
    (["loss.name=hinge"], "loss.name"),
    (["data.attributes=[Smiling, Smiley]"], "Smiley"),
    # one attribute twice would train two outputs for it and report one of them (metrics are keyed by name)
    (["data.attributes=[Smiling, Male, Smiling]"], "data.attributes: attribute list has duplicates: ['Smiling', 'Male', 'Smiling']"),
    (["model.dropoutt=0.1"], "model.dropoutt"),
    (["data.transform=zoom"], "data.transform"),
    (["train.epochs=0"], "train.epochs"),
    (["train.tune_thresholds=f1"], "train.tune_thresholds: 'f1' is not one of"),
    (["train.ema_decay=-0.1"], "train.ema_decay must be in"),
    (["eval.tta=five_crop"], "eval.tta"),
    # numbers outside what a run can use: named here, not as a modulo by zero or an empty run later
    (["train.log_every_steps=0"], "train.log_every_steps must be >= 1, got 0"),
    (["train.sync_every_steps=0"], "train.sync_every_steps must be >= 1, got 0"),
    (["train.max_steps=-1"], "train.max_steps must be >= 0, got -1"),
    (["train.collective_timeout_min=0"], "train.collective_timeout_min must be > 0, got 0.0"),
    (["data.loader_timeout_s=-1"], "data.loader_timeout_s must be >= 0, got -1.0"),
    (["data.image_size=[0, 0]"], "data.image_size must be >= 8, got (0, 0)"),
    (["data.eval_batch_size=-3"], "data.eval_batch_size must be >= 0, got -3"),
    (["optim.lr=.inf"], "optim.lr must be > 0, got inf"),
    (["optim.lr=0"], "optim.lr must be > 0, got 0.0"),
    (["train.seed=-1"], "train.seed must be an integer in [0, 4294967295], got -1"),
    (["train.keep_last=0"], "train.keep_last must be >= 1, got 0"),
    (["optim.betas=[0.9, 1.5]"], "optim.betas must be >= 0 and <= 1, got (0.9, 1.5)"),
    # a fraction where a count is meant is refused, never truncated (2.5 would silently train at batch 2)
    (["data.batch_size=2.5"], "data.batch_size: expected an integer, got 2.5"),
    (["train.eval_splits=[val, tset]"], "train.eval_splits: ['tset'] not in ['val', 'test']"),
])
def test_bad_configs_name_the_key_and_choices(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config("smiling_simple_cnn", override)
    if "unknown choice" in message:
        assert "valid" in str(info.value)


def test_unknown_recipe_lists_shipped():
    with pytest.raises(ConfigError, match="smiling_simple_cnn"):
        load_config("no_such_recipe")


@pytest.mark.parametrize("content, message", [
    (b"data: 5\n", "section data must be a mapping of keys"),
    (b"train: [1]\n", "section train must be a mapping of keys"),
    (b"optim:\n  lr: 0.001 \xe9\n", "not UTF-8 text (byte 19)"),
])
def test_recipe_file_mistakes_name_the_file_even_with_overrides(tmp_path, content, message):
    path = tmp_path / "mine.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: {re.escape(message)}"):
        load_config(str(path), ["train.max_steps=2"], data_dir="shards")


def test_bad_yaml_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(str(path))


def test_recipes_show_prints_the_resolved_config(capsys, tmp_path):
    from celeba_dist.config import recipes_main

    assert recipes_main(["--show", "attrs40_resnext50"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    expected = load_config("attrs40_resnext50").to_dict()
    assert shown == expected
    # every key, the recipe's own values and the defaults: the printed file is a complete config again
    assert shown["model"]["name"] == "resnext50_32x4d" and shown["loss"]["name"] == "mse_pm1"
    assert shown["train"]["log_every_steps"] == 50
    path = tmp_path / "attrs40_resnext50.yaml"
    path.write_text(yaml.safe_dump(shown))
    assert load_config(str(path)).to_dict() == expected


def test_input_normalisation_follows_the_weights():
    assert load_config("smiling_simple_cnn").data.normalize == "unit"  # auto, trained from scratch
    imagenet = load_config("default", ["model.name=resnext50_32x4d", "model.pretrained=imagenet"])
    assert imagenet.data.normalize == "imagenet"  # auto follows the ImageNet weights
    scratch = load_config("default", ["model.name=resnext50_32x4d", "data.normalize=imagenet"])
    assert scratch.data.normalize == "imagenet"  # an explicit choice stands where nothing contradicts it
    with pytest.raises(ConfigError, match=r"data\.normalize='unit' contradicts model\.pretrained='imagenet'"):
        load_config("attrs40_resnext50", ["data.normalize=unit"])
    saved = load_config("attrs40_resnext50").to_dict()  # what a checkpoint keeps is the resolved value
    assert saved["data"]["normalize"] == "imagenet"


def test_recipes_show_of_an_unknown_recipe_is_one_error_line(capsys):
    from celeba_dist.config import recipes_main

    assert recipes_main(["--show", "no_such_recipe"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("celeba-dist recipes: error: unknown recipe 'no_such_recipe'; shipped recipes:")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_accuracy_recipes_optimise_what_they_claim():
    acc, bal = load_config("best_40attr"), load_config("best_40attr_balanced")
    assert not acc.loss.pos_weight and acc.train.select_metric == acc.train.tune_thresholds == "accuracy"
    assert bal.loss.pos_weight and bal.train.select_metric == bal.train.tune_thresholds == "balanced_accuracy"
    for cfg in (acc, bal):
        assert cfg.train.ema_decay == 0.9998 and cfg.eval.tta == "flip"


def test_earlier_boolean_tune_thresholds_still_reads():
    # checkpoints and recipes of earlier versions wrote train.tune_thresholds: true (balanced thresholds)
    assert load_config("smiling_simple_cnn", ["train.tune_thresholds=true"]).train.tune_thresholds == "balanced_accuracy"
    assert load_config("smiling_simple_cnn", ["train.tune_thresholds=false"]).train.tune_thresholds == "none"
    assert load_config("smiling_simple_cnn").train.ema_decay is None
    assert load_config("smiling_simple_cnn", ["train.ema_decay=0.99"]).train.ema_decay == 0.99
    assert load_config("smiling_simple_cnn", ["train.ema_decay=null"]).train.ema_decay is None
