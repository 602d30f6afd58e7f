"""Encoders for the training loop, all built like torchvision classifiers: ``factory(num_classes=dim)``.

Every encoder ends in a linear layer named ``fc`` (the projection to the contrastive dimension), so
:class:`moco_fast.MoCo` can put an MLP in front of it exactly as the official code does, and
:func:`backbone_features` can read the representation before it (what the kNN monitor uses).

* ``cnn``       — a small 4-layer CNN for 28×28 inputs (MNIST), ~0.1 M parameters at width 16.
* ``resnet18``  — torchvision ResNet-18 with the CIFAR stem (3×3 stride-1 conv1, no max-pool).
* ``resnet50``  — torchvision ResNet-50, unchanged (ImageNet stem).

``in_channels`` other than 3 replaces conv1 (grayscale data needs no fake RGB copy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor, nn

MODELS = ("cnn", "resnet18", "resnet50")


class SmallCNN(nn.Module):
    """conv-BN-ReLU, max-pool, conv-BN-ReLU, max-pool, conv-BN-ReLU ×2, average pool to pool×pool, ``fc``.

    For 28×28 inputs (28→14→7). ``width`` w gives channels w, 2w, 4w, 4w; the representation is the
    4w×pool×pool average-pooled map, flattened (576-d for w=16, pool=3). Pooling to 3×3 rather than
    1×1 keeps the coarse layout of a digit: on MNIST-5k it lifts the held-out kNN accuracy by about
    three points over global average pooling at the same cost.
    """

    def __init__(
        self,
        num_classes: int = 128,
        in_channels: int = 1,
        width: int = 16,
        pool: int = 3,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), norm_layer(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            *block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(pool),
            nn.Flatten(1),
        )
        self.fc = nn.Linear(4 * w * pool * pool, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def _replace_conv1(model: nn.Module, in_channels: int, kernel_size: int, stride: int, padding: int) -> None:
    old = model.conv1
    model.conv1 = nn.Conv2d(in_channels, old.out_channels, kernel_size, stride, padding, bias=False)


def resnet18_cifar(num_classes: int = 128, in_channels: int = 3) -> nn.Module:
    """ResNet-18 with the CIFAR stem of the MoCo CIFAR demo: conv1 3×3 stride 1, no max-pool."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    _replace_conv1(model, in_channels, 3, 1, 1)
    model.maxpool = nn.Identity()
    return model


def resnet50(num_classes: int = 128, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-50 (zero-init of the last BN is not used, as in MoCo)."""
    from torchvision.models import resnet50 as tv_resnet50

    model = tv_resnet50(num_classes=num_classes)
    if in_channels != 3:
        _replace_conv1(model, in_channels, 7, 2, 3)
    return model


def encoder_factory(name: str, in_channels: int = 3, width: int = 16) -> Callable[..., nn.Module]:
    """A ``base_encoder`` for :class:`moco_fast.MoCo`: ``factory(num_classes=dim) -> nn.Module``."""
    if name == "cnn":
        return functools.partial(SmallCNN, in_channels=in_channels, width=width)
    if name == "resnet18":
        return functools.partial(resnet18_cifar, in_channels=in_channels)
    if name == "resnet50":
        return functools.partial(resnet50, in_channels=in_channels)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def backbone_features(encoder: nn.Module, x: Tensor) -> Tensor:
    """The encoder's representation before ``fc`` (the projection head, linear or MLP)."""
    fc = encoder.fc
    encoder.fc = nn.Identity()
    try:
        return encoder(x)
    finally:
        encoder.fc = fc


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MODELS",
    "SmallCNN",
    "backbone_features",
    "count_parameters",
    "encoder_factory",
    "resnet18_cifar",
    "resnet50",
]
