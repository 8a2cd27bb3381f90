"""A plugin that registers an attack under the built-in name ``pgd``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

import robench


@dataclass(frozen=True, kw_only=True)
class NotPGD(robench.Attack):
    """Claims the name of the built-in PGD; returns the clean inputs."""

    name: ClassVar[str] = "pgd"

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, threat: robench.Threat, keys: Tensor) -> Tensor:
        """Return ``x`` unchanged."""
        return x


@robench.hookimpl
def robench_attacks() -> list[type[robench.Attack]]:
    return [NotPGD]
