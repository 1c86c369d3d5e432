"""Models: shapes and gradients, freezing, attention, the registry, pretrained weights, the CLI table."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from celeba_dist.models import (
    MODELS, build_model, count_parameters, list_models, model_spec, trainable_parameters,
)
from celeba_dist.models.cli import list_main
from celeba_dist.models.pretrained import WeightsUnavailableError, cached_weights_path, imagenet_weights

N = 40
FORWARD_MODELS = [
    "simple_cnn", "celeb_cnn", "resnext50_32x4d", "resnet18_lstm_attn",
    "torchvision:resnet18", "torchvision:efficientnet_b0", "torchvision:squeezenet1_0", "torchvision:mobilenet_v3_small",
]
FROZEN_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.")
RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1 (the DEFAULT)


@pytest.fixture(autouse=True)
def _isolated_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty torch hub cache and offline mode: nothing may download."""
    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("CELEBA_DIST_OFFLINE", "1")
    torch.manual_seed(0)
    return torch_home


def _images(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *model_spec(name).input_size)


@pytest.mark.parametrize("name", FORWARD_MODELS)
def test_forward_backward_at_default_size(name: str) -> None:
    model = build_model(name, num_attributes=N)
    logits = model(_images(name))
    assert logits.shape == (2, N)
    assert torch.isfinite(logits).all()
    nn.functional.binary_cross_entropy_with_logits(logits, torch.rand(2, N).round()).backward()
    grads = [p.grad for p in trainable_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_celeb_cnn_runs_on_full_celeba_frames() -> None:
    model = build_model("celeb_cnn", num_attributes=N).eval()
    assert model(torch.randn(2, 3, 218, 178)).shape == (2, N)


def test_resnext_freezing_survives_an_optimizer_step() -> None:
    model = build_model("resnext50_32x4d", num_attributes=N, freeze_children=6)
    model.eval().train()  # a round trip must not wake the frozen BatchNorm layers
    named = dict(model.named_parameters())
    frozen = {n: p.detach().clone() for n, p in named.items() if not p.requires_grad}
    assert frozen and all(n.startswith(FROZEN_PREFIXES) for n in frozen)
    assert all(p.requires_grad == (not n.startswith(FROZEN_PREFIXES)) for n, p in named.items())
    frozen_buffers = {n: b.clone() for n, b in model.named_buffers() if n.startswith(FROZEN_PREFIXES)}
    live_buffer = model.layer3[0].bn1.running_mean.clone()
    trainable = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    total, n_trainable = count_parameters(model)
    assert n_trainable == sum(p.numel() for p in trainable.values()) < total

    optimizer = torch.optim.Adamax(trainable_parameters(model), lr=1e-2)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(named[n]) for n in frozen}
    assert not model.bn1.training and not model.layer2[0].bn1.training and model.layer3[0].bn1.training
    logits = model(_images("resnext50_32x4d"))
    nn.functional.binary_cross_entropy_with_logits(logits, torch.rand(2, N).round()).backward()
    optimizer.step()

    assert all(torch.equal(named[n], before) for n, before in frozen.items())
    assert all(named[n].grad is None for n in frozen)
    assert all(torch.equal(b, frozen_buffers[n]) for n, b in model.named_buffers() if n in frozen_buffers)
    assert not torch.equal(model.layer3[0].bn1.running_mean, live_buffer)
    assert all(not torch.equal(named[n], before) for n, before in trainable.items())


def test_attention_weights_are_row_distributions() -> None:
    model = build_model("resnet18_lstm_attn", num_attributes=N, num_heads=4, pooling="max").eval()
    logits, attn = model(_images("resnet18_lstm_attn"), return_attention=True)
    assert logits.shape == (2, N)
    assert attn.shape == (2, 4, 49, 49)  # (B, heads, regions, regions): a 7x7 map at 224x224
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 49), atol=1e-5, rtol=0)
    assert model(_images("resnet18_lstm_attn")).shape == (2, N)


def test_registry_lists_and_rejects() -> None:
    assert {"simple_cnn", "celeb_cnn", "resnext50_32x4d", "resnet18_lstm_attn"} <= set(list_models())
    assert model_spec("resnext50_32x4d").input_size == (218, 178)
    assert model_spec("celeb_cnn").options["fc_hidden"] == 512
    assert model_spec("torchvision:inception_v3").input_size == (299, 299)
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*simple_cnn.*torchvision:<name>"):
        build_model("nope", num_attributes=N)
    with pytest.raises(ValueError, match=r"'widht'.*widths"):
        build_model("celeb_cnn", num_attributes=N, widht=(8, 16))
    with pytest.raises(ValueError, match=r"unknown torchvision model 'resnet19'.*resnet18"):
        build_model("torchvision:resnet19", num_attributes=N)
    with pytest.raises(ValueError, match="bogus"):
        build_model("torchvision:mobilenet_v3_small", num_attributes=N, bogus=1)
    with pytest.raises(ValueError, match="pooling"):
        build_model("resnet18_lstm_attn", num_attributes=N, pooling="median")
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_model("simple_cnn", num_attributes=N, pretrained="imagenet")


def test_torchvision_options_reach_the_builder() -> None:
    model = build_model("torchvision:efficientnet_b0", num_attributes=3, dropout=0.125)
    assert model.classifier[0].p == 0.125 and model.classifier[-1].out_features == 3


def _cache_resnet18(torch_home: Path, value: float) -> Path:
    """Write a recognisable resnet18 state dict where torchvision's cache keeps the ImageNet file."""
    path = cached_weights_path(imagenet_weights("resnet18"))
    assert path == torch_home / "hub" / "checkpoints" / RESNET18_FILE
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"].fill_(value)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


def test_imagenet_weights_load_from_the_torch_hub_cache(_isolated_weights: Path) -> None:
    _cache_resnet18(_isolated_weights, 0.25)
    lstm = build_model("resnet18_lstm_attn", num_attributes=N, pretrained="imagenet")
    assert torch.all(lstm.trunk.conv1.weight == 0.25)
    plain = build_model("torchvision:resnet18", num_attributes=N, pretrained="imagenet")
    assert torch.all(plain.conv1.weight == 0.25) and plain.fc.weight.shape == (N, 512)


def test_missing_imagenet_weights_offline_name_the_file() -> None:
    with pytest.raises(WeightsUnavailableError, match=RESNET18_FILE) as err:
        build_model("resnet18_lstm_attn", num_attributes=N, pretrained="imagenet")
    assert "offline" in str(err.value) and "https://download.pytorch.org/models/" + RESNET18_FILE in str(err.value)


def test_failed_download_names_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CELEBA_DIST_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(self: object, *args: object, **kwargs: object) -> None:
        raise URLError("no network in tests")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_network)
    with pytest.raises(WeightsUnavailableError, match=rf"download failed.*{RESNET18_FILE}"):
        build_model("torchvision:resnet18", num_attributes=N, pretrained="imagenet")


def test_state_dict_files_load_with_a_resized_head(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = build_model("simple_cnn", num_attributes=N)
    checkpoint = tmp_path / "ckpt.pt"
    rng = {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}  # as in our checkpoints
    torch.save({"model": {"module." + k: v for k, v in source.state_dict().items()}, "rng": rng}, checkpoint)
    same = build_model("simple_cnn", num_attributes=N, pretrained=str(checkpoint))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), source.state_dict().values()))
    with caplog.at_level(logging.WARNING, logger="celeba_dist.models.pretrained"):
        resized = build_model("simple_cnn", num_attributes=5, pretrained=str(checkpoint))
    assert "head.weight" in caplog.text
    assert torch.equal(resized.features[0].weight, source.features[0].weight) and resized.head.out_features == 5


def test_state_dict_file_of_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "simple.pt"
    torch.save(build_model("simple_cnn", num_attributes=N).state_dict(), path)
    with pytest.raises(ValueError, match=r"missing keys .*features\.0\..*unexpected keys"):
        build_model("celeb_cnn", num_attributes=N, pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="no_such_file"):
        build_model("simple_cnn", num_attributes=N, pretrained=str(tmp_path / "no_such_file.pt"))


def readme_models() -> dict[str, tuple[str, str, str]]:
    """The README's model table: name -> (parameters, trainable, input HxW) as printed."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text.split("| name | parameters (40 attr.) |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[1]:  # `torchvision:<any>` has no counts
            rows[cells[0].strip("`")] = (cells[1], cells[2], cells[3].split()[0].replace("×", "x"))
    return rows


def test_list_main_prints_every_model_with_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert list_main([]) == 0
    out = capsys.readouterr().out
    printed = {line.split()[0]: line.split()[1:4] for line in out.splitlines() if line and not line.startswith("model")}
    for name in MODELS:
        total, trainable = count_parameters(build_model(name, num_attributes=N, **model_spec(name).options))
        assert printed[name][:2] == [f"{total:,}", f"{trainable:,}"], name
    # the README's table says what the command prints (and so what the models really have)
    documented = readme_models()
    assert set(MODELS) <= set(documented) and "torchvision:convnext_tiny" in documented
    for name, row in documented.items():
        assert tuple(printed[name]) == row, name
    assert "torchvision:resnet50" in out and "torchvision:<name>" in out


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_pretrained_files_never_run_code_and_safetensors_load(tmp_path: Path) -> None:
    """model.pretrained=FILE reads with weights_only (a pickle that would run code is refused by name, and the
    code does not run) or, for .safetensors (an export's weights), with safetensors."""
    from safetensors.torch import save_file

    source = build_model("simple_cnn", num_attributes=N)
    marker = tmp_path / "code-ran"
    bad = tmp_path / "bad.pt"
    torch.save({"model": source.state_dict(), "extra": _RunsCode(marker)}, bad)
    with pytest.raises(ValueError, match=r"model.pretrained .*bad.pt refused: .*posix.system"):
        build_model("simple_cnn", num_attributes=N, pretrained=str(bad))
    assert not marker.exists()
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    loaded = build_model("simple_cnn", num_attributes=N, pretrained=str(weights))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_lstm_attention_model_is_the_documented_pipeline(pooling: str) -> None:
    """ResNet-18 regions -> BiLSTM -> self-attention with residual + LayerNorm -> the chosen pooling -> head,
    recomputed by hand from the model's own layers (a 64x64 input: a 2x2 map of 4 regions)."""
    model = build_model("resnet18_lstm_attn", num_attributes=N, pooling=pooling, lstm_hidden=16).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        regions = model.trunk(x).flatten(2).transpose(1, 2)  # (B, 4, 512), raster order
        seq, _ = model.lstm(model.proj(regions))
        assert seq.shape == (3, 4, 32) and model.lstm.bidirectional
        ctx, _ = model.attn(seq, seq, seq)
        refined = model.norm(seq + ctx)
        pooled = refined.mean(dim=1) if pooling == "mean" else refined.amax(dim=1)
        torch.testing.assert_close(model(x), model.head(pooled), rtol=1e-5, atol=1e-5)
        other = refined.amax(dim=1) if pooling == "mean" else refined.mean(dim=1)
        assert not torch.allclose(model.head(other), model(x))  # the two poolings really differ here


def test_squeezenet_head_gives_negative_logits() -> None:
    """SqueezeNet's classifier ends Conv -> ReLU: kept, every logit would be >= 0 and every attribute predicted
    positive (sigmoid >= 0.5). The ReLU after the replaced conv goes."""
    model = build_model("torchvision:squeezenet1_0", num_attributes=N).eval()
    assert isinstance(model.classifier[1], nn.Conv2d) and isinstance(model.classifier[2], nn.Identity)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 96, 96))
    assert logits.shape == (2, N) and (logits < 0).any()


def test_auxiliary_heads_are_dropped_so_training_gets_plain_logits() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FutureWarning about its init at each build either
        model = build_model("torchvision:googlenet", num_attributes=N).train()  # built with its aux classifiers
    out = model(torch.randn(2, 3, 96, 96))
    assert isinstance(out, torch.Tensor) and out.shape == (2, N)
    assert model.aux1 is None and model.aux2 is None


def test_simple_cnn_kaiming_init_is_he_normal_and_a_wrong_name_is_a_config_error() -> None:
    """``model.init=kaiming``: every conv's weights He-normal for ReLU (std sqrt(2 / fan_out)) and zero biases;
    the default keeps PyTorch's own (uniform, std 1 / sqrt(3 fan_in)). A wrong name stops at the config."""
    from celeba_dist.config import ConfigError, load_config

    torch.manual_seed(0)
    convs = {init: [m for m in build_model("simple_cnn", num_attributes=N, init=init).modules()
                    if isinstance(m, nn.Conv2d)] for init in ("pytorch", "kaiming")}
    for he, default in zip(convs["kaiming"], convs["pytorch"]):
        fan_out = he.out_channels * he.kernel_size[0] * he.kernel_size[1]
        fan_in = he.in_channels * he.kernel_size[0] * he.kernel_size[1]
        assert he.weight.detach().std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
        assert he.bias.detach().abs().max().item() == 0.0
        assert default.weight.detach().std().item() == pytest.approx((1 / (3 * fan_in)) ** 0.5, rel=0.1)
        assert default.bias.detach().abs().max().item() > 0.0
    assert load_config("smiling_simple_cnn", ["model.init=kaiming"]).model.options == {"init": "kaiming"}
    with pytest.raises(ConfigError, match=r"model\.init: unknown choice 'he'; valid: \['pytorch', 'kaiming'\]"):
        load_config("smiling_simple_cnn", ["model.init=he"])
    with pytest.raises(ValueError, match=r"model\.init: unknown choice 'he'"):
        build_model("simple_cnn", num_attributes=N, init="he")
