"""The named dynamic spaces a ProARD (or TRADES teacher) build can use, and their construction.

``resnet`` and ``mbv3`` are the released code's CIFAR spaces (METHODS.md §4.2: OFA's
ResNet50 bottleneck space and MobileNetV3, GPU-sized); ``resnet-mini`` and ``mbv3-mini``
keep every elastic dimension and its choices' structure at a width and depth that trains
in CPU minutes on 28x28 grey images (the smoke preset). Any space builds for any input
shape: the first conv reads the dataset's channels, global pooling absorbs the image side
(28 or 32), the classifier has the dataset's classes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from robench import DataShape
from robench.plugins.proard.mbv3 import DynamicMobileNetV3, MobileNetSpace
from robench.plugins.proard.resnet import DynamicResNet, ResNetSpace
from robench.plugins.proard.space import Config

DynamicNet = DynamicResNet | DynamicMobileNetV3

SPACES: dict[str, ResNetSpace | MobileNetSpace] = {
    "resnet": ResNetSpace(),
    # CPU-sized: stride 2 from the first stage (28 -> 14 -> 7 -> 4), rounding to 2 channels so
    # that each width and expand choice still gives its own channel count at these widths
    "resnet-mini": ResNetSpace(stem=(8, 16), widths=(32, 64, 128), base_depth=(1, 1, 1), strides=(2, 2, 2), divisor=2),
    "mbv3": MobileNetSpace(),
    "mbv3-mini": MobileNetSpace(
        first=8,
        widths=(16, 24, 32, 48, 64),
        strides=(2, 2, 2, 1, 1),
        final=(128, 256),
        divisor=4,
        depth_choices=(1, 2, 3),
    ),
}
"""Space name -> its sizes and choices."""


def build(space: str, shape: DataShape, dropout: float = 0.0) -> DynamicNet:
    """A fresh dynamic network of the named space for ``shape``, its largest configuration active."""
    if space not in SPACES:
        raise ValueError(f"unknown dynamic space {space!r}; use one of {', '.join(SPACES)}")
    spec = SPACES[space]
    if isinstance(spec, ResNetSpace):
        return DynamicResNet(spec, shape, dropout)
    return DynamicMobileNetV3(spec, shape, dropout)


def static_builder(space: str, shape: DataShape) -> Callable[[Config], nn.Module]:
    """``config -> an untrained static network of that configuration`` (skeletons to load into)."""

    def make(config: Config) -> nn.Module:
        net = build(space, shape)
        net.set_active(config)
        return net.extract()

    return make
