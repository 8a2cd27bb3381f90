"""The ProARD pipeline: progressive shrinking stages, student selection, static baselines.

Every training phase is one :func:`robench.train` call (a shrinking stage, a static
student's adversarial training), so each checkpoints and resumes on its own.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from robench import Context, ImageData, Schedule, pgd_inputs, subset_indices, train
from robench.plugins.proard.losses import ShrinkingLoss, recalibrate_bn
from robench.plugins.proard.nets import DynamicNet
from robench.plugins.proard.search import Costs, Space, candidates, score
from robench.plugins.proard.space import STAGES, Config, Student, encode, stage_spaces

# Independent random streams of one build (see Context.generator).
SALT_STAGES, SALT_SEARCH, SALT_HOLDOUT, SALT_BN = 311, 312, 313, 314


@dataclass(frozen=True)
class Shrinking:
    """How the dynamic network is trained after the teacher (METHODS.md §4.4, §4.5).

    :param epochs: epochs per stage of :data:`STAGES` (0 skips the stage)
    :param lrs: initial lr per stage
    :param k: students per batch (``batch`` sampling) or per epoch (``epoch``) per stage
    :param random: sample the whole space in every stage (no progressive schedule)
    :param sampling: ``batch`` or ``epoch`` (see :class:`ShrinkingLoss`)
    :param attack: RSLAD inner maximisation: (eps, step, steps), pixel units
    :param adv_weight: weight of the adversarial KL term (RSLAD: 5/6; the clean one gets the rest)
    :param reorganize: sort middle channels by importance before each stage (OFA)
    """

    epochs: tuple[int, ...]
    lrs: tuple[float, ...]
    k: tuple[int, ...]
    random: bool
    sampling: Literal["batch", "epoch"]
    attack: tuple[float, float, int]
    adv_weight: float
    reorganize: bool


@dataclass(frozen=True)
class Selection:
    """How students are chosen and finished (METHODS.md §4.6).

    :param candidates: configurations compared per budget
    :param holdout: training images held out of shrinking for the comparison
    :param search_steps: PGD steps of the comparison's robust accuracy (eps as in training)
    :param bn_images: training images each student's BatchNorm is recalibrated on
    :param bn_batch: batch size of the recalibration
    """

    candidates: int
    holdout: int
    search_steps: int
    bn_images: int
    bn_batch: int


def split_holdout(ctx: Context, holdout: int) -> tuple[Context, Tensor]:
    """``ctx`` without ``holdout`` random training images, and those images' indices (in ``ctx.train``)."""
    n = len(ctx.train)
    if holdout <= 0:
        return ctx, torch.arange(0)
    if holdout >= n:
        raise ValueError(f"holdout={holdout} leaves no training images (the split has {n})")
    order = torch.randperm(n, generator=ctx.generator(SALT_HOLDOUT))
    held, kept = order[:holdout].sort().values, order[holdout:].sort().values
    train_split = ImageData(ctx.train.images[kept], ctx.train.labels[kept])
    return dataclasses.replace(ctx, train=train_split), held


def shrink(net: DynamicNet, teacher: nn.Module, ctx: Context, base: Schedule, plan: Shrinking) -> DynamicNet:
    """Progressive shrinking: one :func:`robench.train` phase per stage with epochs, RSLAD loss."""
    spaces = stage_spaces(net.choices, random=plan.random)
    n_train = len(subset_indices(len(ctx.train), base.train_subset, ctx.seed))
    batches = -(-n_train // base.batch_size)
    for i, (stage, enabled) in enumerate(zip(STAGES, spaces, strict=True)):
        epochs = plan.epochs[i]
        if epochs == 0:
            continue
        if plan.reorganize:
            net.reorganize()
        passes = plan.k[i] if plan.sampling == "epoch" else 1
        schedule = dataclasses.replace(base, epochs=epochs * passes, lr=plan.lrs[i], milestones=())
        loss = ShrinkingLoss(
            teacher, net.lengths, enabled, plan.k[i], plan.attack, ctx.seed * 1_000_003 + SALT_STAGES + i,
            sampling=plan.sampling, batches_per_pass=batches, adv_weight=plan.adv_weight,
        )  # fmt: skip
        ctx.progress.log(f"proard stage {stage}: {encode(enabled)}, k={plan.k[i]}, {epochs} epoch(s)")
        train(net, ctx, schedule, loss=loss, desc=f"proard {stage}")
    return net


def finish(net: DynamicNet, config: Config, ctx: Context, sel: Selection, indices: Tensor) -> nn.Module:
    """The static student of ``config``, BatchNorm recalibrated on ``indices`` of ``ctx.train``."""
    net.set_active(config)
    static = copy.deepcopy(net).extract()
    return recalibrate_bn(static, ctx.train, indices, sel.bn_batch, ctx.device)


def select(
    net: DynamicNet,
    budgets: tuple[str, ...],
    ctx: Context,
    held: tuple[Tensor, Tensor] | None,
    sel: Selection,
    eps: float,
    builder: Callable[[Config], nn.Module],
) -> dict[str, Student]:
    """Budget -> the best static student found within it (see :mod:`search`), compared on the
    ``held`` images and labels (none: the first candidate, the largest within the budget)."""
    bn_indices = subset_indices(len(ctx.train), sel.bn_images, ctx.seed * 1_000_003 + SALT_BN)
    example = ctx.train.batch(torch.arange(1))[0]
    costs, gen = Costs(builder, example), ctx.generator(SALT_SEARCH)
    space = Space(net.lengths, net.choices)
    x, y = held if held is not None else (None, None)
    chosen: dict[str, Student] = {}
    for budget in budgets:
        options = candidates(budget, space, costs, gen, sel.candidates)
        best: tuple[tuple[float, float] | None, Config, nn.Module] | None = None
        for config in options:
            student = finish(net, config, ctx, sel, bn_indices)
            if len(options) == 1 or x is None or y is None:
                best = (None, config, student)  # nothing to compare it with: not scored
                break
            result = score(student, x.to(ctx.device), y.to(ctx.device), eps, sel.search_steps, ctx.seed)
            if best is None or best[0] is None or result > best[0]:
                best = (result, config, student)
        assert best is not None
        scores, config, student = best
        cost = costs(config)
        found = (
            "the only candidate"
            if scores is None
            else (f"held-out robust {scores[0]:.3f} clean {scores[1]:.3f} (best of {len(options)})")
        )
        ctx.progress.log(f"proard student {budget}: {cost.macs} MACs, {cost.params} params, {found}: {encode(config)}")
        chosen[budget] = Student(student.cpu(), config, builder)
    return chosen


def train_static(
    config: Config,
    builder: Callable[[Config], nn.Module],
    ctx: Context,
    schedule: Schedule,
    pgd: tuple[float, int, float],
) -> Student:
    """``config`` as a static network trained alone from scratch with PGD adversarial training (Madry)."""
    eps, steps, fraction = pgd
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed * 1_000_003 + int(hashlib.sha256(encode(config).encode()).hexdigest()[:8], 16))
        net = builder(config)
    for module in net.modules():  # fresh statistics: the builder's come from an untrained dynamic net
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
    inputs = pgd_inputs(eps, steps, fraction, random_start=True)
    trained = train(net.train(), ctx, schedule, inputs=inputs, desc=f"static {encode(config)[:40]}")
    return Student(trained.cpu().eval(), config, builder)
