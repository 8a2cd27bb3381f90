"""The contract for architecture plugins, and the normalisation every model carries inside."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robench.context import DataShape
from robench.plugin import Plugin


@dataclass(frozen=True, kw_only=True)
class Architecture(Plugin, ABC):
    """Base class for architectures: a named model constructor that adapts to the data."""

    kind: ClassVar[str] = "architecture"

    @abstractmethod
    def build(self, shape: DataShape) -> nn.Module:
        """A freshly initialised network for normalised inputs of ``shape``; logits out."""


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as the model's first layer.

    Keeping it inside the model means attacks see [0, 1] inputs and eps in pixel units.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise a [0, 1] batch."""
        return (x - self.mean) / self.std


def make_model(arch: Architecture, shape: DataShape) -> nn.Module:
    """The deployable model: normalisation, then the architecture's network."""
    return nn.Sequential(Normalize(shape.mean, shape.std), arch.build(shape))
