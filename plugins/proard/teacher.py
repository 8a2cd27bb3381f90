"""``trades``: TRADES adversarial training, as its own cached build (ProARD's teacher; METHODS.md §4.3).

Any defense can reuse the model through ``ctx.get_models("trades", {...})``. Which network
it trains:

* ``space = ""`` (default): the benchmark's architecture (``ctx.new_model()``), a plain
  TRADES baseline;
* ``space = "<name>"`` (one of :data:`robench.plugins.proard.nets.SPACES`): the **largest
  configuration of that dynamic space**, kept as the dynamic network itself. This is how
  ProARD chooses its teacher's architecture (the released ``train_teacher_net.py``): the
  dynamic net is no registered architecture, so the benchmark's ``arch`` axis does not pick
  it, and the teacher both initialises the dynamic network and distils into it.

Paper values (the field defaults; METHODS.md §4.3): beta 6, Linf eps 0.031 in 10 sign steps
of 0.0078 (a quarter of eps) from x + 0.001 N(0, 1); SGD nesterov, momentum 0.9, weight
decay 2e-4, lr 0.1, batch 128, 120 epochs. The released cosine schedule with 5 warm-up
epochs is approximated by x0.1 steps at 1/2 and 3/4 of the epochs (robench's
:class:`robench.Schedule` is step-wise), and weight decay applies to every parameter
(the released code exempts BN and biases).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

import robench
from robench import Schedule, train
from robench.plugins.proard.losses import TradesLoss
from robench.plugins.proard.nets import SPACES, build

TEACHER_SALT = 301
"""Generator salt of the TRADES random starts (independent of the data order's stream)."""


def step_milestones(epochs: int) -> tuple[int, ...]:
    """Epochs after which the lr drops x0.1: half and three quarters through (cosine, step-wise)."""
    return tuple(sorted({m for m in (epochs // 2, 3 * epochs // 4) if 0 < m < epochs}))


@dataclass(frozen=True, kw_only=True)
class Trades(robench.Defense):
    """TRADES adversarial training (Zhang et al. 2019); with ``space``, a ProARD dynamic space's largest network.

    Args:
        space: empty for the benchmark's architecture, else a dynamic space (``resnet``,
            ``resnet-mini``, ``mbv3``, ``mbv3-mini``) whose largest configuration is trained.
        beta: weight of the KL robustness term.
        eps: Linf radius, pixel units (0 = the dataset's default).
        steps: sign-ascent steps of the inner maximisation.
        step: ascent step as a fraction of eps.
        epochs: training epochs.
        lr: initial learning rate (x0.1 at 1/2 and 3/4 of the epochs).
        momentum: SGD (nesterov) momentum.
        weight_decay: SGD weight decay.
        batch_size: training batch size.
        train_subset: train on this many random training images (0 = all).
    """

    name: ClassVar[str] = "trades"
    presets: ClassVar[dict[str, dict[str, object]]] = {
        "paper": {},
        "smoke": {"epochs": 2, "train_subset": 2000, "steps": 3, "batch_size": 64, "lr": 0.05},
    }
    space: str = ""
    beta: float = 6.0
    eps: float = 0.031
    steps: int = 10
    step: float = 0.25
    epochs: int = 120
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    batch_size: int = 128
    train_subset: int = 0

    def __post_init__(self) -> None:
        if self.space and self.space not in SPACES:
            raise ValueError(f"unknown space {self.space!r}; use one of {', '.join(SPACES)} (or '' for the arch)")
        if not (0 <= self.eps <= 1 and self.steps >= 1 and 0 < self.step <= 1 and self.beta >= 0):
            raise ValueError("eps in [0, 1], steps >= 1, step in (0, 1], beta >= 0")
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1 or self.train_subset < 0:
            raise ValueError("epochs >= 1, lr > 0, batch_size >= 1, train_subset >= 0")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError("momentum in [0, 1), weight_decay >= 0")

    def schedule(self) -> Schedule:
        """The SGD schedule."""
        return Schedule(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            nesterov=self.momentum > 0,
            milestones=step_milestones(self.epochs),
            train_subset=self.train_subset,
        )

    def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """Train the network on TRADES examples."""
        model = self.skeletons(ctx)["model"].train()
        eps = self.eps or ctx.default_eps
        loss = TradesLoss(eps, self.step * eps, self.steps, self.beta, ctx.seed * 1_000_003 + TEACHER_SALT)
        label = self.space or "arch"
        return {"model": train(model, ctx, self.schedule(), loss=loss, desc=f"trades {label}").cpu().eval()}

    def skeletons(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """The architecture's fresh model, or the dynamic space's network (largest configuration, no dropout)."""
        return {"model": build(self.space, ctx.shape) if self.space else ctx.new_model()}
