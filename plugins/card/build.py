"""Building one CARD: dense training, then lottery-ticket or one-shot pruning, or biprop.

Every training run is its own :func:`robench.train` phase (dense, each pruning round, the
one-shot fine-tuning), so a build killed mid-way resumes in the phase it was in: the
finished phases load their final checkpoints, and pruning between them is a deterministic
function of the weights.

* **LRR** (learning-rate rewinding, Renda et al. 2020): after each pruning round the
  surviving weights are kept and the learning-rate schedule is rewound.
* **LTH** (weight rewinding, Frankle & Carbin 2019): after each pruning round the surviving
  weights are reset to their initial values and the schedule is rewound.

The two share everything else (mask, round schedule, loss, data); :func:`rewind` is the
only difference. A round's schedule is the last ``round_epochs`` epochs of the dense
schedule (Renda et al.'s "retrain with the last t epochs of the schedule"; the whole
schedule when ``round_epochs`` equals ``epochs``).
* **one-shot + fine-tuning** (the CARD paper's "traditional" baseline): prune to the target
  at once, then fine-tune at the dense schedule's final learning rate for as many epochs as
  all of the lottery rounds together, so both get the same retraining budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

import robench
from robench import Schedule, subset_indices, train
from robench.plugins.card.augment import FAMILIES, Family, FamilyLoss
from robench.plugins.card.binary import bake, biprop
from robench.plugins.card.deck import signature
from robench.plugins.card.prune import Scope, keep_masks, make_permanent, prune_round, rewind_weights, weights_of

Method = Literal["lrr", "lth", "oneshot", "dense", "biprop"]


@dataclass(frozen=True)
class Recipe:
    """How to build one card (the defense's parameters that matter to it)."""

    method: Method
    sparsity: float
    rounds: int
    scope: Scope
    dense: Schedule
    round_epochs: int
    finetune_lr: float
    jsd_weight: float
    severity: int
    noise_sigma: float

    def round_schedule(self) -> Schedule:
        """The last ``round_epochs`` epochs of the dense schedule: LR rewinding's schedule."""
        shift = self.dense.epochs - self.round_epochs
        passed = sum(1 for m in self.dense.milestones if m <= shift)
        return dataclasses.replace(
            self.dense,
            epochs=self.round_epochs,
            lr=self.dense.lr * self.dense.gamma**passed,
            milestones=tuple(m - shift for m in self.dense.milestones if m > shift),
        )

    def finetune_schedule(self) -> Schedule:
        """One-shot fine-tuning: the lottery rounds' epochs, at the final dense learning rate."""
        final = self.dense.lr * self.dense.gamma ** len(self.dense.milestones)
        return dataclasses.replace(
            self.dense, epochs=self.rounds * self.round_epochs, lr=self.finetune_lr or final, milestones=()
        )

    def loss(self, family: Family, seed: int) -> FamilyLoss:
        """The family's training loss with its own generator."""
        return FamilyLoss(
            family, seed, jsd_weight=self.jsd_weight, severity=self.severity, noise_sigma=self.noise_sigma
        )


def card_seed(seed: int, family: Family, index: int) -> int:
    """The seed of card ``index`` of ``family``: the same card whatever else the deck holds."""
    return seed * 1009 + 101 * FAMILIES.index(family) + index


def fresh(new_model: object, seed: int) -> nn.Module:
    """``new_model()`` initialised from ``seed`` (its own draws, not the process's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: nn.Module = new_model()  # type: ignore[operator]
    return model


def rewind(model: nn.Module, method: Method, init: Mapping[str, Tensor]) -> None:
    """What a lottery round rewinds besides the schedule: LTH the weights, LRR nothing."""
    if method == "lth":
        rewind_weights(model, init)


def finite(model: nn.Module, desc: str) -> nn.Module:
    """``model``, after checking that training left no NaN or infinite weight.

    :raises RuntimeError: naming the phase, so a diverged build fails before any evaluation
    """
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"{desc} diverged: non-finite weights in {', '.join(bad[:3])}; lower the learning rate")
    return model


def build_card(ctx: robench.Context, recipe: Recipe, family: Family, index: int, name: str) -> nn.Module:
    """Train and compress one card; returns a plain module (masks folded into the weights)."""
    seed = card_seed(ctx.seed, family, index)
    cctx = dataclasses.replace(ctx, seed=seed)
    model = fresh(ctx.new_model, seed)
    if recipe.method == "biprop":
        biprop(model, recipe.sparsity, torch.Generator().manual_seed(seed))
        model = train(model, cctx, recipe.dense, loss=recipe.loss(family, seed), desc=f"{name} biprop")
        return finite(bake(model), f"{name} biprop").cpu()
    init = weights_of(model)
    model = finite(
        train(model, cctx, recipe.dense, loss=recipe.loss(family, seed), desc=f"{name} dense"), f"{name} dense"
    )
    if recipe.method == "oneshot":
        prune_round(model, recipe.sparsity, 1, 1, recipe.scope)
        ft = recipe.finetune_schedule()
        model = train(model, cctx, ft, loss=recipe.loss(family, seed + 1), after_step=keep_masks, desc=f"{name} FT")
        finite(model, f"{name} FT")
    elif recipe.method in ("lrr", "lth"):
        for r in range(1, recipe.rounds + 1):
            model = lottery_round(model, cctx, recipe, family, r, init, name)
    return make_permanent(model).cpu()


def lottery_round(
    model: nn.Module,
    ctx: robench.Context,
    recipe: Recipe,
    family: Family,
    r: int,
    init: Mapping[str, Tensor],
    name: str,
) -> nn.Module:
    """Round ``r``: prune by magnitude, rewind (:func:`rewind`), retrain with the masks kept."""
    prune_round(model, recipe.sparsity, r, recipe.rounds, recipe.scope)
    rewind(model, recipe.method, init)
    desc = f"{name} {recipe.method} round {r}/{recipe.rounds}"
    loss = recipe.loss(family, ctx.seed + 1 + r)
    return finite(train(model, ctx, recipe.round_schedule(), loss=loss, after_step=keep_masks, desc=desc), desc)


def family_signature(ctx: robench.Context, recipe: Recipe, family: Family, n_images: int) -> Tensor:
    """The Fourier signature of ``n_images`` training images augmented with ``family``: the
    mean over images of each image's DFT magnitude, accumulated in chunks of 256."""
    seed = card_seed(ctx.seed, family, 0) + 7919
    index = subset_indices(len(ctx.train), n_images, seed)
    loss = recipe.loss(family, seed)
    total = torch.zeros(ctx.shape.channels, ctx.shape.height, ctx.shape.width)
    for start in range(0, len(index), 256):
        x, _ = ctx.train.batch(index[start : start + 256])
        total += signature(loss.augment(x)) * len(x)
    return total / len(index)
