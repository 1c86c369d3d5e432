"""Typed, validated configuration: defaults ← recipe ← command line, merged in one place.

``recipes/default.yaml`` holds every key with its default. A recipe (a shipped
``recipes/NAME.yaml`` or any YAML file) holds only what it changes; ``--set a.b=v``
overrides come last. :func:`load_config` merges the three, rejects unknown keys and wrong
types with a message that names the key and lists the valid choices, and returns a frozen
:class:`Config`. Runtime state (rank, device, step) never lives here.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from celeba_dist.cli_args import report_error
from celeba_dist.diskio import write_text


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the valid choices."""


@dataclass(frozen=True)
class DataConfig:
    root: str = "shards"
    attributes: Any = "all"  # "all", "drawn", or a list of names
    batch_size: int = 64  # per process
    eval_batch_size: int = 0  # 0: same as batch_size
    num_workers: int = 2
    loader_timeout_s: float = 600.0  # no batch from the workers for this long (a hung worker) is an error; 0: none
    transform: str = "crop178_resize"
    image_size: tuple[int, int] = (64, 64)  # (H, W) fed to the model
    normalize: str = "auto"  # auto (what the model's weights expect) | unit (x/255) | imagenet
    shuffle_buffer: int = 1000
    train_subset: int = 0  # 0: every training sample; N: a fixed subset of N samples
    check_shards: str = "size"  # before the first step: size (a stat per shard) | sha256 | none
    skip_bad_samples: bool = False  # a sample that cannot be decoded is skipped and counted instead of ending the run
    cache: str = "none"  # none | host | device: each rank's share decoded once, kept in that memory (data/cache.py)
    cache_decode: str = "cpu"  # cpu (loader workers) | device (TorchCodec, nvJPEG on a GPU; cache=device only)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "simple_cnn"
    pretrained: str = "none"  # "none", "imagenet" or a path to a weights file
    options: dict = field(default_factory=dict)  # the model's own keys, written as model.<key>


@dataclass(frozen=True)
class LossConfig:
    name: str = "bce"  # bce | mse_pm1
    pos_weight: bool = False  # BCE positive weights from the manifest's training positive rates


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class SchedConfig:
    name: str = "constant"  # constant | step | cosine | onecycle | cyclic
    warmup_steps: int = 0
    step_size_epochs: int = 10  # step: decay every N epochs
    gamma: float = 0.1
    min_lr: float = 0.0  # cosine floor
    base_lr: float = 1e-4  # cyclic: lower bound; optim.lr is the upper bound
    cycle_epochs: float = 2.0  # cyclic: a full up-and-down cycle, in epochs
    cyclic_mode: str = "triangular"
    pct_start: float = 0.3  # onecycle


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0  # 0: no limit; N: stop after N optimizer steps (smoke runs)
    precision: str = "no"  # bf16 | fp16 | no
    seed: int = 0
    deterministic: bool = False
    grad_accum_steps: int = 1
    clip_grad_norm: float = 0.0  # 0: no clipping
    channels_last: bool = False
    compile: bool = False
    log_every_steps: int = 50
    sync_every_steps: int = 10  # how often ranks agree on stop requests and a finite loss
    collective_timeout_min: float = 30.0  # a collective that waits longer (a dead or hung rank) is an error
    checkpoint_every_steps: int = 500  # 0: only at epoch ends
    keep_last: int = 2
    select_metric: str = "accuracy"  # mean validation metric that picks the best epoch
    tune_thresholds: str = "none"  # none (0.5) | accuracy | balanced_accuracy: per-attribute thresholds tuned on val
    eval_splits: tuple[str, ...] = ("val", "test")
    ema_decay: float | None = None  # null: off; d: an EMA of the weights (d * ema + (1 - d) * w per step)


@dataclass(frozen=True)
class EvalConfig:
    tta: str = "none"  # none | flip: average the probabilities of the image and its mirror


@dataclass(frozen=True)
class LogConfig:
    image_grid_size: int = 16  # validation images drawn with their labels each epoch; 0: none
    progress_bar: bool = True


@dataclass(frozen=True)
class RunConfig:
    dir: str = ""  # "": runs/<name>
    name: str = "run"
    resume: str = "auto"  # auto (the newest valid checkpoint of run.dir) | none | a checkpoint file
    max_requeues: int = 3  # SLURM: how often a preempted or timed-out job requeues itself
    lock_stale_s: float = 300.0  # a run folder's lock not refreshed for this long is taken over


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


SECTIONS: dict[str, type] = typing.get_type_hints(Config)
# Choices checked here, so a typo fails before any model or data is touched.
CHOICES: dict[str, tuple[str, ...]] = {
    "train.precision": ("no", "bf16", "fp16"),
    "run.resume": (),  # free-form: auto | none | path
    "sched.cyclic_mode": ("triangular", "triangular2", "exp_range"),
    "data.normalize": ("auto", "unit", "imagenet"),
    "data.check_shards": ("size", "sha256", "none"),
    "data.cache": ("none", "host", "device"),
    "data.cache_decode": ("cpu", "device"),
    "train.tune_thresholds": ("none", "accuracy", "balanced_accuracy"),
    "eval.tta": ("none", "flip"),
}
# Values earlier versions wrote (configs saved in checkpoints, old recipe files), read as today's.
LEGACY_VALUES: dict[str, dict[Any, Any]] = {
    "train.tune_thresholds": {True: "balanced_accuracy", False: "none"},  # was a bool: balanced thresholds
}


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the config dumps as plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Recipes


def recipes_dir() -> Path:
    return Path(str(resources.files("celeba_dist") / "recipes"))


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml") if p.stem != "default")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): save the recipe as UTF-8") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    for name, values in data.items():  # checked here, so the error names this file, not a later --set or --data
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{path}: section {name} must be a mapping of keys (e.g. {name}:\n  key: value), "
                              f"got {values!r}")
    return data


def resolve_recipe(name_or_file: str) -> Path:
    """A shipped recipe name, or a path to a YAML file."""
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    shipped = recipes_dir() / f"{name_or_file}.yaml"
    if name_or_file == "default" or not shipped.is_file():
        raise ConfigError(f"unknown recipe {name_or_file!r}; shipped recipes: {shipped_recipes()} (or pass a .yaml file)")
    return shipped


# ---------------------------------------------------------------------------------------------
# Merging and validation


YAML11_WORDS = {"no": False, "yes": True, "off": False, "on": True, "y": True, "n": False}


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` → (["optim", "lr"], 3e-4). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be dotted, e.g. optim.lr=3e-4")
    text = raw.strip()
    if text.lower() in YAML11_WORDS:  # keep "no"/"off"/... as written: train.precision=no is a string
        return parts, text
    try:
        value = yaml.safe_load(raw) if text else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _set_dotted(tree: dict[str, Any], parts: list[str], value: Any, source: str) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parts)}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of nested mappings; values of ``update`` win."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field's type hint, converting where YAML is ambiguous."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in YAML11_WORDS:
            return YAML11_WORDS[value.lower()]
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/yes/off/on as a boolean
            raise ConfigError(f"{key}: expected a string, got {value!r}; quote the value in YAML, e.g. \"no\"")
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    raise ConfigError(f"{key}: unsupported type {hint}")


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            if cls is ModelConfig:  # model.<key> are the model's own options, checked by the registry
                extra[key] = value
                continue
            raise ConfigError(f"unknown key {name}.{key}; valid keys in {name}: {known}")
        legacy = LEGACY_VALUES.get(f"{name}.{key}", {})
        if isinstance(value, (bool, str)) and _legacy_key(value) in legacy:
            value = legacy[_legacy_key(value)]
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
        choices = CHOICES.get(f"{name}.{key}")
        if choices and kwargs[key] not in choices:
            raise ConfigError(f"{name}.{key}: {kwargs[key]!r} is not one of {list(choices)}")
    if cls is ModelConfig:
        kwargs["options"] = {**kwargs.get("options", {}), **extra}
    return cls(**kwargs)


def _legacy_key(value: bool | str) -> Any:
    return YAML11_WORDS.get(value.lower(), value) if isinstance(value, str) else value


def from_dict(tree: dict[str, Any]) -> Config:
    """Validate a nested mapping into a :class:`Config` (every section optional)."""
    unknown = sorted(set(tree) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; valid sections: {list(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = tree.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"section {name} must be a mapping, got {values!r}")
        sections[name] = _build_section(name, cls, values)
    config = Config(**sections)
    validate_choices(config)
    return resolve_normalize(config)


def resolve_normalize(config: Config) -> Config:
    """``data.normalize: auto`` becomes what the model's weights expect (ImageNet weights: ``imagenet``,
    otherwise ``unit``); an explicit value that contradicts ImageNet weights is an error naming both keys."""
    from celeba_dist.models import expected_normalize

    expected = expected_normalize(config.model.pretrained)
    if config.data.normalize == "auto":
        return dataclasses.replace(config, data=dataclasses.replace(config.data, normalize=expected))
    if expected == "imagenet" and config.data.normalize != expected:
        raise ConfigError(f"data.normalize={config.data.normalize!r} contradicts model.pretrained="
                          f"{config.model.pretrained!r}: ImageNet weights expect ImageNet-normalised inputs; "
                          "set data.normalize=imagenet (or auto)")
    return config


def validate_choices(config: Config) -> None:
    """Check names that live in registries (model, loss, optimizer, scheduler, transform, attributes)."""
    from celeba_dist.train import losses, optim
    from celeba_dist.data import transforms
    from celeba_dist.attributes import resolve_attributes
    from celeba_dist.models import list_models, model_spec

    def check(key: str, value: str, valid: list[str]) -> None:
        if value not in valid:
            raise ConfigError(f"{key}: unknown choice {value!r}; valid: {valid}")

    check("loss.name", config.loss.name, sorted(losses.LOSSES))
    check("optim.name", config.optim.name, sorted(optim.OPTIMIZERS))
    check("sched.name", config.sched.name, sorted(optim.SCHEDULERS))
    check("data.transform", config.data.transform, sorted(transforms.PRESETS))
    if not config.model.name.startswith("torchvision:"):
        check("model.name", config.model.name, list_models() + ["torchvision:<name>"])
    try:
        spec = model_spec(config.model.name)
    except ValueError as exc:
        raise ConfigError(f"model.name: {exc}") from exc
    unknown = sorted(set(config.model.options) - set(spec.options))
    if unknown and not spec.forwards_options:  # torchvision:<name> options are checked when built
        raise ConfigError(f"unknown key(s) {['model.' + k for k in unknown]} for model {config.model.name}; "
                          f"valid: {['model.' + k for k in ('name', 'pretrained', *spec.options)]}")
    for key, valid in spec.choices.items():
        if key in config.model.options:
            check(f"model.{key}", config.model.options[key], list(valid))
    try:
        resolve_attributes(config.data.attributes)
    except ValueError as exc:
        raise ConfigError(f"data.attributes: {exc}") from exc
    _check_ranges(config)
    if config.run.lock_stale_s < 10:
        raise ConfigError(f"run.lock_stale_s must be >= 10 (seconds), got {config.run.lock_stale_s:g}: a live "
                          f"run refreshes its lock every min(30, lock_stale_s / 4) s")
    decay = config.train.ema_decay
    if decay is not None and not 0.0 <= decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (or null: no EMA), got {decay:g}")
    if config.data.cache_decode == "device" and config.data.cache != "device":
        raise ConfigError(f"data.cache_decode=device decodes into the device's cache: it needs data.cache=device, "
                          f"not {config.data.cache!r}")
    if config.data.cache_decode == "device" and importlib.util.find_spec("torchcodec") is None:
        raise ConfigError("data.cache_decode=device decodes with TorchCodec, which is not installed: "
                          "pip install 'celeba-dist[gpu-decode]' (or torchcodec matching your torch)")
    bad = [s for s in config.train.eval_splits if s not in ("val", "test")]
    if bad:
        raise ConfigError(f"train.eval_splits: {bad} not in ['val', 'test']")


# The numbers a run can use: key -> (lowest valid, highest valid or None). A value outside fails here,
# naming the key, instead of as an obscure error (a modulo by zero, an empty run) deep in a run.
RANGES: dict[str, tuple[float, float | None]] = {
    "data.batch_size": (1, None), "data.eval_batch_size": (0, None), "data.num_workers": (0, None),
    "data.loader_timeout_s": (0, None),
    "data.image_size": (8, None), "data.shuffle_buffer": (0, None), "data.train_subset": (0, None),
    "train.epochs": (1, None), "train.max_steps": (0, None), "train.seed": (0, 2**32 - 1),
    "train.grad_accum_steps": (1, None), "train.clip_grad_norm": (0, None), "train.log_every_steps": (1, None),
    "train.sync_every_steps": (1, None), "train.collective_timeout_min": (0, None),
    "train.checkpoint_every_steps": (0, None), "train.keep_last": (1, None),
    "optim.lr": (0, None), "optim.weight_decay": (0, None), "optim.momentum": (0, 1), "optim.betas": (0, 1),
    "sched.warmup_steps": (0, None), "sched.step_size_epochs": (1, None), "sched.gamma": (0, None),
    "sched.min_lr": (0, None), "sched.base_lr": (0, None), "sched.cycle_epochs": (0, None),
    "sched.pct_start": (0, 1), "run.max_requeues": (0, None),
}
# The lowest is not valid itself:
ABOVE_LOW = {"optim.lr", "train.collective_timeout_min", "sched.gamma", "sched.cycle_epochs", "sched.pct_start"}


def _check_ranges(config: Config) -> None:
    for key, (low, high) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        above = key in ABOVE_LOW
        for number in value if isinstance(value, tuple) else (value,):
            if not (math.isfinite(number) and (number > low if above else number >= low)
                    and (high is None or number <= high)):
                bound = (f"{'>' if above else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
                         if high is None or high < 2**31 else f"an integer in [{low}, {high}]")
                raise ConfigError(f"{key} must be {bound}, got {value!r}")


def load_config(
    config: str = "default",
    overrides: list[str] | tuple[str, ...] = (),
    *,
    data_dir: str | None = None,
    run_dir: str | None = None,
) -> Config:
    """Defaults ← recipe ``config`` ← ``--data``/``--run-dir`` ← dotted ``overrides``."""
    tree = _read_yaml(recipes_dir() / "default.yaml")
    if config != "default":
        recipe_path = resolve_recipe(config)
        recipe = _read_yaml(recipe_path)
        tree = merge(tree, recipe)
        tree.setdefault("run", {}).setdefault("name", recipe_path.stem)
        if "name" not in recipe.get("run", {}):
            tree["run"]["name"] = recipe_path.stem
    return config_from_tree(tree, overrides, data_dir=data_dir, run_dir=run_dir)


def config_from_tree(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), *,
                     data_dir: str | None = None, run_dir: str | None = None) -> Config:
    """A resolved mapping (e.g. a checkpoint's config) with ``--data``/``--run-dir`` and overrides applied."""
    tree = copy.deepcopy(tree)
    if data_dir is not None:
        tree.setdefault("data", {})["root"] = str(data_dir)
    if run_dir is not None:
        tree.setdefault("run", {})["dir"] = str(run_dir)
    for text in overrides:
        parts, value = parse_override(text)
        _set_dotted(tree, parts, value, f"--set {text}")
    model = tree.get("model") or {}
    if isinstance(model.get("options"), dict):  # a saved config nests the model's own keys
        tree["model"] = {**{k: v for k, v in model.items() if k != "options"}, **model["options"]}
    return from_dict(tree)


def save_config(config: Config, path: Path) -> None:
    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def add_set_argument(parser: argparse.ArgumentParser, help: str = "dotted overrides, e.g. optim.lr=3e-4") -> None:
    """``--set KEY=VALUE ...``: dotted config overrides (:func:`parse_override`), repeatable; every command's."""
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help=help)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every entry point that builds a config shares."""
    parser.add_argument("--config", default="default", help="a shipped recipe name (celeba-dist recipes) or a YAML file")
    parser.add_argument("--data", default=None, help="the packed shards folder (with manifest.json)")
    parser.add_argument("--run-dir", default=None, help="the run directory (default runs/<recipe>)")
    add_set_argument(parser)


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.set, data_dir=args.data, run_dir=args.run_dir)


def recipes_main(argv: list[str] | None = None) -> int:
    """``celeba-dist recipes``: the shipped recipes with their model and a one-line summary."""
    parser = argparse.ArgumentParser(prog="celeba-dist recipes", description="List the shipped recipes.")
    parser.add_argument("--show", metavar="NAME", help="print one recipe's resolved config")
    args = parser.parse_args(argv)
    if args.show:
        try:
            config = load_config(args.show)
        except ConfigError as exc:
            return report_error("celeba-dist recipes", exc)
        print(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return 0
    for name in shipped_recipes():
        cfg = load_config(name)
        first = (recipes_dir() / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:<26} model={cfg.model.name:<20} {first}")
    return 0
