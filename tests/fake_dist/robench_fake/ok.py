"""A well-behaved third-party plugin: one tiny attack and one extra CLI command."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import click
import torch
from torch import Tensor, nn

import robench
from robench.attack import sample_uniform


@dataclass(frozen=True, kw_only=True)
class Noise(robench.Attack):
    """Random sign noise of size eps, drawn per sample from the keys (a sanity baseline).

    Distance measure: Linf.

    Args:
        scale: noise size as a fraction of eps.
    """

    name: ClassVar[str] = "noise"
    scale: float = 1.0

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, threat: robench.Threat, keys: Tensor) -> Tensor:
        """Add ``scale * eps`` times a per-sample random sign to every pixel, clipped to [0, 1]."""
        sign = sample_uniform(keys, x.shape[1:], -1.0, 1.0).sign().to(x.device, x.dtype)
        return torch.clamp(x + self.scale * threat.eps * sign, 0.0, 1.0)


@click.command(name="fake-hello")
def hello() -> None:
    """Say hello from robench-fake."""
    click.echo("hello from robench-fake")


@robench.hookimpl
def robench_attacks() -> list[type[robench.Attack]]:
    return [Noise]


@robench.hookimpl
def robench_commands() -> list[click.Command]:
    return [hello]
