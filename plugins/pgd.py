"""Projected gradient descent (Madry et al. 2018), Linf and L2, with per-sample random starts.

The iteration is torchattacks' PGD / PGDL2 (``torchattacks.attacks.pgd``): same step,
same projection, same clipping, and a test checks the two agree exactly without random
start. What is written here is what torchattacks lacks: random starts drawn per sample from
the runner's keys (torchattacks draws them per batch from the global generator, so a
sample's start would depend on its batch, DESIGN.md §5), a CW-margin loss option, and
per-sample (summed) losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

import robench
from robench import LossName, Norm, get_loss, sample_normal, sample_uniform


def random_start(keys: Tensor, x: Tensor, norm: Norm, eps: float) -> Tensor:
    """torchattacks' random start (uniform in the Linf box; random direction and radius
    for L2), drawn per sample from ``keys``."""
    shape = x.shape[1:]
    if norm == "linf":
        return sample_uniform(keys, shape, -eps, eps)
    direction = sample_normal(keys, shape)
    radius = sample_uniform(keys + 1, torch.Size([1, 1, 1]), 0.0, 1.0)
    return direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * radius * eps


def engine_settings(attack: Any, x: Tensor, threat: robench.Threat, keys: Tensor) -> dict[str, Any]:
    """The keyword arguments a keyed iterative engine takes, from an attack's usual fields
    (``steps``, ``step_size`` as a fraction of eps, ``loss``, ``confidence`` and, if it has
    one, ``random_start``): one place, so every iterative attack reads them the same way."""
    start = random_start(keys, x, threat.norm, threat.eps) if getattr(attack, "random_start", False) else None
    return {
        "norm": threat.norm,
        "eps": threat.eps,
        "alpha": attack.step_size * threat.eps,
        "steps": attack.steps,
        "start": start,
        "loss": get_loss(attack.loss, attack.confidence),
    }


@dataclass(frozen=True, kw_only=True)
class PGD(robench.Attack):
    """Projected gradient descent (Madry et al. 2018), Linf or L2, random restarts as versions.

    Distance measure: Linf or L2.

    Args:
        steps: number of gradient steps.
        step_size: step size as a fraction of eps (0.2 = eps/5, as in DVERGE and EIO).
        restarts: number of random restarts; each is a separate version.
        random_start: start each restart at a random point of the eps-ball.
        loss: ``ce`` (cross-entropy) or ``cw`` (CW margin).
        confidence: the CW margin's confidence.
        stop_on_success: freeze a sample at its first iterate the model misclassifies,
            as AutoAttack keeps the first adversarial point found (default). Off, every
            sample runs all steps and only the last iterate counts, as in torchattacks.
    """

    name: ClassVar[str] = "pgd"
    norms: ClassVar[frozenset[Norm]] = frozenset({"linf", "l2"})
    steps: int = 20
    step_size: float = 0.2
    restarts: int = 5
    random_start: bool = True
    loss: LossName = "ce"
    confidence: float = 0.1
    stop_on_success: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.restarts < 1 or self.step_size <= 0:
            raise ValueError("steps and restarts must be >= 1 and step_size > 0")

    def n_versions(self) -> int:
        """One version per restart (only one without random start: restarts would be equal)."""
        return self.restarts if self.random_start else 1

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, threat: robench.Threat, keys: Tensor) -> Tensor:
        """Run PGD from the per-sample start given by ``keys``."""
        from robench.plugins._keyed import KeyedPGD  # torchattacks: imported when an attack runs

        attack = KeyedPGD(model, **engine_settings(self, x, threat, keys), stop_on_success=self.stop_on_success)
        out: Tensor = attack(x, y)
        return out


@dataclass(frozen=True, kw_only=True)
class FGSM(robench.Attack):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps.

    Distance measure: Linf (sign step) or L2 (normalised-gradient step).
    Equals ``torchattacks.FGSM`` for Linf and cross-entropy.

    Args:
        loss: ``ce`` (cross-entropy) or ``cw`` (CW margin).
        confidence: the CW margin's confidence.
    """

    name: ClassVar[str] = "fgsm"
    norms: ClassVar[frozenset[Norm]] = frozenset({"linf", "l2"})
    loss: LossName = "ce"
    confidence: float = 0.1

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, threat: robench.Threat, keys: Tensor) -> Tensor:
        """One gradient step of length eps from the clean input."""
        from robench.plugins._keyed import KeyedPGD

        attack = KeyedPGD(
            model,
            norm=threat.norm,
            eps=threat.eps,
            alpha=threat.eps,
            steps=1,
            start=None,
            loss=get_loss(self.loss, self.confidence),
        )
        out: Tensor = attack(x, y)
        return out


@robench.hookimpl
def robench_attacks() -> list[type[robench.Attack]]:
    """PGD and FGSM."""
    return [FGSM, PGD]


__all__ = ["FGSM", "PGD", "engine_settings", "random_start"]
