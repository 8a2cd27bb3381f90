"""Baseline defenses: standard training and PGD adversarial training (Madry et al. 2018).

Presets (``robench.Defense.presets``), with where each value comes from:

* ``paper`` (Fashion-MNIST): the Adver-Fine paper's schedule (METHODS.md §3.3): 20 epochs,
  SGD without momentum or weight decay, batch 64, lr 0.1 for 5 epochs then 0.01; adversarial
  training on PGD-20 with step eps/10 (0.01 in the paper's normalised units, where eps is
  0.1), no random start.
* ``paper:cifar10`` / ``paper:cifar100``: DVERGE's baseline schedule (METHODS.md §1.6):
  200 epochs, SGD lr 0.1, momentum 0.9, wd 1e-4, batch 128, lr x0.1 at epochs 100 and 150,
  crop+flip; adversarial training with Madry's PGD-10, step eps/4 (2/255 at 8/255).
* ``smoke``: a 2-core CPU budget on Fashion-MNIST: a training subset, 2 epochs, SGD with
  momentum 0.9 at lr 0.02, and PGD-5 (step eps/4, random start) for adversarial training,
  with the training eps ramped up over the first 20 % of steps (``eps_warmup``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

import robench
from robench import Schedule, pgd_inputs, train

_CIFAR = {
    "epochs": 200,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "milestones": (100, 150),
    "augment": "crop-flip",
}
# Smoke: half the training set, 2 epochs, with momentum so 2 epochs reach ~85 % clean
# (the paper's momentum-free SGD needs its 20 epochs).
_SMOKE = {"epochs": 2, "train_subset": 30000, "lr": 0.02, "momentum": 0.9}


@dataclass(frozen=True, kw_only=True)
class Baseline(robench.Defense):
    """Standard training with cross-entropy: the undefended reference (and transfer surrogate).

    Args:
        epochs: training epochs.
        batch_size: training batch size.
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        milestones: epochs after which the learning rate is multiplied by ``gamma``.
        gamma: learning-rate decay factor.
        train_subset: train on this many random training images (0 = all).
        augment: ``none`` or ``crop-flip``.
    """

    name: ClassVar[str] = "baseline"
    presets: ClassVar[dict[str, dict[str, object]]] = {
        "paper": {},
        "paper:cifar10": _CIFAR,
        "paper:cifar100": _CIFAR,
        "smoke": _SMOKE,
    }
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = (5,)
    gamma: float = 0.1
    train_subset: int = 0
    augment: Literal["none", "crop-flip"] = "none"

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs must be >= 0, batch_size >= 1 and lr > 0")

    def schedule(self) -> Schedule:
        """The training schedule these parameters describe."""
        return Schedule(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            milestones=self.milestones,
            gamma=self.gamma,
            train_subset=self.train_subset,
            augment=self.augment,
        )

    def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """Train a fresh model on clean data."""
        return {"model": train(ctx.new_model(), ctx, self.schedule(), desc=f"{self.name} train")}


@dataclass(frozen=True, kw_only=True)
class AdversarialTraining(Baseline):
    """PGD adversarial training (Madry et al. 2018): train on PGD examples only.

    Args (besides the training ones of ``baseline``):
        eps: training Linf radius in pixel units; 0 means the dataset's default eps.
        attack_steps: PGD steps per training batch.
        attack_step_size: PGD step as a fraction of eps.
        random_start: start PGD at a random point of the eps-ball.
        eps_warmup: fraction of the training steps over which the training eps ramps linearly
            from 0 to ``eps`` (0 = Madry's constant eps). A no-BatchNorm network such as cnn8,
            trained adversarially from scratch for only a few hundred steps, can stay stuck
            predicting one class; a short ramp lets it learn clean features first (the smoke
            preset uses 0.2).
    """

    name: ClassVar[str] = "advt"
    presets: ClassVar[dict[str, dict[str, object]]] = {
        "paper": {"attack_steps": 20, "attack_step_size": 0.1, "random_start": False},
        "paper:cifar10": {**_CIFAR, "attack_steps": 10, "attack_step_size": 0.25},
        "paper:cifar100": {**_CIFAR, "attack_steps": 10, "attack_step_size": 0.25},
        "smoke": {**_SMOKE, "train_subset": 15000, "attack_steps": 5, "attack_step_size": 0.25, "eps_warmup": 0.2},
    }
    eps: float = 0.0
    attack_steps: int = 10
    attack_step_size: float = 0.25
    random_start: bool = True
    eps_warmup: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.eps_warmup <= 1 or self.eps < 0 or self.attack_steps < 1:
            raise ValueError("eps_warmup must be in [0, 1], eps >= 0 and attack_steps >= 1")

    def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """Train a fresh model on PGD examples generated against itself."""
        eps = self.eps or ctx.default_eps
        n_train = min(self.train_subset or len(ctx.train), len(ctx.train))
        ramp_steps = self.eps_warmup * self.epochs * -(-n_train // self.batch_size)
        inputs = pgd_inputs(
            eps, self.attack_steps, self.attack_step_size, random_start=self.random_start, ramp_steps=ramp_steps
        )
        model = ctx.new_model()
        return {"model": train(model, ctx, self.schedule(), inputs=inputs, desc=f"{self.name} train")}


@robench.hookimpl
def robench_defenses() -> list[type[robench.Defense]]:
    """baseline and advt."""
    return [AdversarialTraining, Baseline]
