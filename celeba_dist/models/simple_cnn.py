"""``simple_cnn``: the small smile classifier on 64x64 crops (Raschka et al., *Machine Learning
with PyTorch and Scikit-Learn*, ch. 14), generalised to N attributes.

Shapes at 64x64: (B, 3, 64, 64) -> 32x32x32 -> 64x16x16 -> 128x8x8 -> 256x8x8 -> (B, 256) -> (B, N).
The source README lists no third max-pool, but then the 256-channel map would be 16x16 and its
"AvgPool 8" would not end in 256 features; the book's model has the pool, and so does this one.
The source ends in Sigmoid + BCELoss; here the model returns logits and the loss is
BCE-with-logits (same maths, numerically stable). 398,696 parameters for 40 attributes.

``model.init``: ``pytorch`` (the default, as the source: each layer's own initialisation) or ``kaiming``
(He-normal conv weights for ReLU, fan-out, zero biases: torchvision's ResNet init). Without normalisation
layers, the default init leaves this net's output nearly blind to its input at first: on the synthetic
CelebA, Smiling sits at chance for hundreds of Adam steps (SGD learns nothing in 10 epochs), and whether
it is learned at all within 10 epochs depends on the seed. With ``kaiming`` and centred inputs
(``data.normalize=imagenet``) it was at each of the four seeds measured (README, tests section).
"""
from __future__ import annotations

from torch import Tensor, nn

from celeba_dist.models.registry import register_model

INITS = ("pytorch", "kaiming")


class SimpleCNN(nn.Module):
    """Four conv layers, global average pooling and one linear head."""

    def __init__(self, *, num_attributes: int, dropout: float = 0.5, init: str = "pytorch") -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout),
            nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout),
            nn.Conv2d(64, 128, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 256, kernel_size=3, padding=1), nn.ReLU(),
            # The source's AvgPool2d(8) is a global average over the 8x8 map at 64x64 input;
            # the adaptive pool computes the same there and still works at other sizes.
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(256, num_attributes)
        if init == "kaiming":
            for conv in (m for m in self.features if isinstance(m, nn.Conv2d)):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
        elif init != "pytorch":
            raise ValueError(f"model.init: unknown choice {init!r}; valid: {list(INITS)}")

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, N) logits."""
        return self.head(self.features(x))  # (B, 256) -> (B, N)


@register_model(
    "simple_cnn", input_size=(64, 64),
    description="4-conv smile classifier (Raschka et al.), global avg pool, linear head",
    choices={"init": INITS},
)
def build_simple_cnn(*, num_attributes: int, dropout: float = 0.5, init: str = "pytorch") -> nn.Module:
    """The smile classifier with an N-attribute head."""
    return SimpleCNN(num_attributes=num_attributes, dropout=dropout, init=init)
