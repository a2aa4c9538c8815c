"""The model zoo: small torch networks whose sizes come from the train config.

Every model takes a float32 batch of shape ``(batch, features)`` and returns class logits, so the
training loop, evaluation and serving treat them alike; the CNN reshapes to its image shape inside.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aiaas import errors
from aiaas.config.train import ModelSpec


class MLP(nn.Module):
    """A multi-layer perceptron with ReLU, dropout and batch-free layers (DDP needs no sync)."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv → ReLU (→ max-pool while the image is large enough) blocks, then a linear head."""

    def __init__(
        self, shape: tuple[int, int, int], channels: list[int], num_classes: int, dropout: float
    ):
        super().__init__()
        self.shape = shape
        blocks: list[nn.Module] = []
        depth, height, width = shape
        for size in channels:
            blocks += [nn.Conv2d(depth, size, kernel_size=3, padding=1), nn.ReLU()]
            if min(height, width) >= 4:
                blocks.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            depth = size
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(depth * height * width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(x.shape[0], *self.shape)))


def build(
    spec: ModelSpec, num_features: int, num_classes: int, shape: list[int] | None
) -> nn.Module:
    """The model a train config names, sized for the data set.

    Raises:
        ConfigError: The model does not fit the data (e.g. a CNN on features that are no image).
    """
    if spec.name == "mlp":
        return MLP(num_features, list(spec.hidden_sizes), num_classes, spec.dropout)
    image = tuple(shape) if shape else _square_image(num_features)
    if image is None or math.prod(image) != num_features:
        raise errors.ConfigError(
            f"model 'cnn' needs image-shaped features, but the data set has {num_features} "
            "features and no image shape",
            "Use model.name: mlp for tabular data.",
        )
    return SmallCNN(image, list(spec.channels), num_classes, spec.dropout)  # type: ignore[arg-type]


def _square_image(num_features: int) -> tuple[int, int, int] | None:
    side = math.isqrt(num_features)
    return (1, side, side) if side * side == num_features else None
