"""``resnet18_lstm_attn``: ResNet-18 region features -> BiLSTM -> multi-head self-attention -> head.

At 224x224 (ImageNet-normalised) the ResNet-18 trunk, without its avgpool and fc, gives a
(B, 512, 7, 7) map: 49 region features, read in raster order (row by row) as a sequence
(B, 49, 512). An optional linear projection shrinks them, a bidirectional LSTM gives every region
context from the regions before and after it (B, 49, 2H), multi-head self-attention lets each
region attend to all others (residual + LayerNorm around it, so the attention refines rather than
replaces the LSTM features), and the sequence is mean- or max-pooled into (B, 2H) for a
dropout + linear head. ``forward(x, return_attention=True)`` also returns the per-head attention
weights (B, heads, 49, 49), each row a distribution over the regions attended to.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from celeba_dist.models.pretrained import torchvision_model
from celeba_dist.models.registry import register_model

POOLINGS = ("mean", "max")


class ResNetLSTMAttention(nn.Module):
    """CNN trunk -> region sequence -> BiLSTM -> self-attention -> pooled -> linear head."""

    def __init__(
        self, resnet: nn.Module, *, num_attributes: int, proj_dim: int | None, lstm_hidden: int,
        lstm_layers: int, num_heads: int, pooling: str, dropout: float,
    ) -> None:
        super().__init__()
        # Every child up to layer4 (drops avgpool and fc); keys stay trunk.conv1..., trunk.layer4...
        self.trunk = nn.Sequential(OrderedDict(list(resnet.named_children())[:-2]))
        channels = resnet.fc.in_features  # 512 for ResNet-18
        self.proj = nn.Sequential(nn.Linear(channels, proj_dim), nn.ReLU(inplace=True)) if proj_dim else nn.Identity()
        self.lstm = nn.LSTM(
            proj_dim or channels, lstm_hidden, num_layers=lstm_layers, batch_first=True, bidirectional=True,
        )
        width = 2 * lstm_hidden
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_attributes)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, 3, H, W) images -> (B, N) logits, plus (B, heads, R, R) weights if asked (R = regions)."""
        regions = self.trunk(x).flatten(2).transpose(1, 2)  # (B, 512, h, w) -> (B, R=h*w, 512)
        seq, _ = self.lstm(self.proj(regions))  # (B, R, 2H)
        # Weights are only materialised when asked: need_weights=False keeps the fused kernel.
        ctx, weights = self.attn(
            seq, seq, seq, need_weights=return_attention, average_attn_weights=False,
        )  # (B, R, 2H), (B, heads, R, R) or None
        seq = self.norm(seq + ctx)  # (B, R, 2H)
        pooled = seq.mean(dim=1) if self.pooling == "mean" else seq.amax(dim=1)  # (B, 2H)
        logits = self.head(self.dropout(pooled))  # (B, N)
        return (logits, weights) if return_attention else logits


@register_model(
    "resnet18_lstm_attn", input_size=(224, 224),
    description="ResNet-18 7x7 regions -> BiLSTM -> multi-head self-attention -> pooled head",
)
def build_resnet18_lstm_attn(
    *,
    num_attributes: int,
    imagenet: str | None = None,
    proj_dim: int | None = None,
    lstm_hidden: int = 256,
    lstm_layers: int = 1,
    num_heads: int = 4,
    pooling: str = "mean",
    dropout: float = 0.5,
) -> nn.Module:
    """The ResNet-18 + BiLSTM + attention model, ResNet-18 trunk from ImageNet when ``imagenet`` is set."""
    if pooling not in POOLINGS:
        raise ValueError(f"resnet18_lstm_attn: unknown pooling {pooling!r}; valid: {list(POOLINGS)}")
    if (2 * lstm_hidden) % num_heads:
        raise ValueError(f"resnet18_lstm_attn: num_heads={num_heads} must divide 2*lstm_hidden={2 * lstm_hidden}")
    return ResNetLSTMAttention(
        torchvision_model("resnet18", imagenet=imagenet), num_attributes=num_attributes, proj_dim=proj_dim,
        lstm_hidden=lstm_hidden, lstm_layers=lstm_layers, num_heads=num_heads, pooling=pooling, dropout=dropout,
    )

