"""``celeb_cnn``: a custom CNN for all 40 attributes, trained from scratch.

The source only says "convolution + ReLU + max-pooling blocks, dropout, fully connected layers".
The design chosen here, with the defaults:

- five blocks ``Conv3x3 -> BatchNorm -> ReLU -> MaxPool2`` with widths 32, 64, 128, 256, 256;
  at 128x128 the map goes (B, 3, 128, 128) -> (B, 32, 64, 64) -> ... -> (B, 256, 4, 4);
- an adaptive average pool to a 4x4 grid, so 178x218 crops (map 6x5) and other sizes fit the
  same head, while a coarse layout (eyes above mouth, hat above hair) survives for the FC layers;
- Flatten (4096) -> Dropout 0.5 -> Linear 4096->512 -> ReLU -> Dropout 0.5 -> Linear 512->N.

BatchNorm is an addition to the source: it makes a from-scratch CNN train at the higher learning
rates used here and removes the sensitivity to input scaling (no ImageNet mean/std for this
model); the conv then needs no bias. ``batch_norm=False`` gives the source's plain blocks.
About 3.1 M parameters for 40 attributes (978 k in the convs, 2.1 M in the first FC layer),
roughly 0.2 GFLOPs per 128x128 image: fast enough to train on every CelebA image per epoch.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from celeba_dist.models.registry import register_model


def conv_block(in_ch: int, out_ch: int, *, batch_norm: bool) -> nn.Sequential:
    """Conv3x3 -> [BatchNorm] -> ReLU -> MaxPool2: halves H and W."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


class CelebCNN(nn.Module):
    """Conv blocks -> adaptive pool to a small grid -> two FC layers."""

    def __init__(
        self, *, num_attributes: int, widths: Sequence[int], fc_hidden: int, dropout: float,
        pool_size: int, batch_norm: bool,
    ) -> None:
        super().__init__()
        channels = [3, *widths]
        self.features = nn.Sequential(
            *(conv_block(c_in, c_out, batch_norm=batch_norm) for c_in, c_out in zip(channels[:-1], channels[1:]))
        )
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(widths[-1] * pool_size * pool_size, fc_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(fc_hidden, num_attributes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, N) logits."""
        x = self.pool(self.features(x))  # (B, C, pool, pool)
        return self.head(self.classifier(x))  # (B, fc_hidden) -> (B, N)


@register_model(
    "celeb_cnn", input_size=(128, 128),
    description="5 conv+BN+ReLU+maxpool blocks, 4x4 adaptive pool, FC 512 (also runs at 218x178)",
)
def build_celeb_cnn(
    *,
    num_attributes: int,
    widths: Sequence[int] = (32, 64, 128, 256, 256),
    fc_hidden: int = 512,
    dropout: float = 0.5,
    pool_size: int = 4,
    batch_norm: bool = True,
) -> nn.Module:
    """The custom CelebA CNN; see the module docstring for the design."""
    if not widths:
        raise ValueError("celeb_cnn: widths must name at least one block")
    return CelebCNN(
        num_attributes=num_attributes, widths=tuple(widths), fc_hidden=fc_hidden, dropout=dropout,
        pool_size=pool_size, batch_norm=batch_norm,
    )
