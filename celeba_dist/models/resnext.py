"""``resnext50_32x4d``: torchvision's ResNeXt-50 (32x4d) with a 2048->N head, early stages frozen.

The state-dict keys are torchvision's own (``conv1.weight``, ``layer1.0...``, ``fc.weight``), so
torchvision's ImageNet file and our checkpoints load the same way.

Freezing: ``freeze_children=6`` sets ``requires_grad=False`` on the first six children (conv1,
bn1, relu, maxpool, layer1, layer2). That alone does not freeze a network with BatchNorm: in
train mode a BN layer still updates its running mean/variance buffers from every batch, so the
"frozen" stages would drift away from the statistics their frozen weights were trained with, and
eval would normalise with statistics nobody trained against. ``train()`` therefore keeps every
BN layer whose parameters are all frozen in eval mode (normalise with the stored statistics,
never update them), the usual "frozen BN" of detection backbones.
"""
from __future__ import annotations

from torch import Tensor, nn

from celeba_dist.models.pretrained import torchvision_model
from celeba_dist.models.registry import register_model

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")


def freeze_first_children(model: nn.Module, count: int) -> list[str]:
    """Set ``requires_grad=False`` on the parameters of the first ``count`` children; their names."""
    children = list(model.named_children())
    if not 0 <= count <= len(children):
        raise ValueError(f"freeze_children must be in [0, {len(children)}], got {count}")
    for _, child in children[:count]:
        child.requires_grad_(False)
    return [name for name, _ in children[:count]]


class FrozenBatchNormMixin(nn.Module):
    """``train(True)`` leaves BatchNorm layers whose parameters are all frozen in eval mode."""

    def train(self, mode: bool = True) -> FrozenBatchNormMixin:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, _BATCH_NORMS) and not any(p.requires_grad for p in module.parameters()):
                module.eval()  # keep running_mean / running_var as they are
        return self


class ResNeXtClassifier(FrozenBatchNormMixin):
    """torchvision's ResNet forward with the children of a built ResNeXt and a new head."""

    def __init__(self, backbone: nn.Module, *, num_attributes: int, freeze: int) -> None:
        super().__init__()
        for name in _CHILDREN:  # same names and order as torchvision, so the keys match its files
            setattr(self, name, getattr(backbone, name))
        self.fc = nn.Linear(self.fc.in_features, num_attributes)  # 2048 -> N, random init
        freeze_first_children(self, freeze)
        self.train()  # apply the frozen-BN rule from the start

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, N) logits."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer2(self.layer1(x))  # (B, 512, H/8, W/8)
        x = self.layer4(self.layer3(x))  # (B, 2048, H/32, W/32)
        return self.fc(self.avgpool(x).flatten(1))  # (B, 2048) -> (B, N)


@register_model(
    "resnext50_32x4d", input_size=(218, 178),
    description="torchvision ResNeXt-50 32x4d, fc 2048->N, first 6 children frozen (BN kept in eval)",
)
def build_resnext50(*, num_attributes: int, imagenet: str | None = None, freeze_children: int = 6) -> nn.Module:
    """ResNeXt-50 with ImageNet trunk weights when ``imagenet`` names a weights tag."""
    backbone = torchvision_model("resnext50_32x4d", imagenet=imagenet)
    return ResNeXtClassifier(backbone, num_attributes=num_attributes, freeze=freeze_children)
