"""The ``proard`` defense: its parameters, presets and variants (METHODS.md §4)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

import robench
from robench import Schedule
from robench.plugins.proard.nets import SPACES, build, static_builder
from robench.plugins.proard.search import parse_budget, variant_name
from robench.plugins.proard.space import STAGES, Student, encode
from robench.plugins.proard.teacher import step_milestones
from robench.plugins.proard.train import Selection, Shrinking, select, shrink, split_holdout, train_static

# Budgets of the static baseline are read from the progressive build with the same
# parameters: these fields only configure the baseline, so they are left out of that build's.
_STATIC_FIELDS = ("training", "static_epochs", "static_lr")

_SMOKE: dict[str, object] = {
    "space": "resnet-mini",
    "eps": 0.1,
    "attack_steps": 3,
    "teacher_epochs": 2,
    "teacher_subset": 2000,
    "teacher_lr": 0.05,
    "teacher_batch_size": 64,
    "stage_epochs": (1, 0, 1, 0, 1),
    "stage_lr": (0.02, 0.0025, 0.0075, 0.0025, 0.0075),
    "k": (1, 2, 2, 2, 2),
    "train_subset": 1000,
    "holdout": 300,
    "candidates": 3,
    "search_steps": 3,
    "bn_images": 500,
    "static_epochs": 3,
    "static_lr": 0.05,
}


@dataclass(frozen=True, kw_only=True)
class ProARD(robench.Defense):
    """ProARD (Mousavi et al. 2025): one robust dynamic network distilled progressively; students by budget.

    A TRADES teacher (the ``trades`` defense, built on ``space``'s largest configuration and
    cached on its own) initialises a weight-shared dynamic network and distils into it with
    RSLAD through progressive shrinking (width or kernel, then depth, then expand ratio).
    Each budget in ``students`` becomes a variant: the best configuration found within it,
    extracted as a plain static network with recalibrated BatchNorm, its configuration in
    the results' ``variant_config`` column.

    Args:
        space: dynamic space: ``resnet``, ``mbv3`` (paper), ``resnet-mini``, ``mbv3-mini`` (CPU).
        training: ``progressive`` (ProARD), ``random`` (every stage samples the whole space:
            the ablation the paper's central claim is against) or ``static`` (each student's
            configuration from the progressive build with these parameters, trained alone
            from scratch with PGD adversarial training: the cost baseline).
        sampling: ``batch`` (k students per batch, gradients accumulated; the paper and OFA)
            or ``epoch`` (k students per epoch, a full pass each; the released code's loop).
        students: budgets: ``smallest``, ``median``, ``largest``, ``macs:<n>``, ``params:<n>``.
        eps: Linf radius of every training attack, pixel units (0 = the dataset's default).
        attack_steps: sign steps of the training attacks (TRADES, RSLAD, static PGD).
        attack_step: attack step as a fraction of eps (0.0078 / 0.031).
        teacher_beta: TRADES beta of the teacher.
        teacher_epochs: teacher epochs.
        teacher_lr: teacher learning rate.
        teacher_batch_size: teacher batch size.
        teacher_subset: teacher training images (0 = all).
        stage_epochs: epochs of the stages width/kernel, depth-1, depth-2, expand-1, expand-2.
        stage_lr: initial lr of each stage.
        k: students sampled per batch (or per epoch) in each stage.
        adv_weight: RSLAD weight of the adversarial KL term (the clean term gets 1 - it).
        batch_size: shrinking batch size.
        momentum: SGD (nesterov) momentum.
        weight_decay: SGD weight decay.
        dropout: classifier dropout while shrinking.
        train_subset: shrinking training images (0 = all but the held-out ones).
        reorganize: sort middle channels by importance before each stage (OFA).
        candidates: configurations compared per budget.
        holdout: training images held out of shrinking to compare candidates.
        search_steps: PGD steps of the comparison.
        bn_images: training images each student's BatchNorm is recalibrated on.
        bn_batch: recalibration batch size.
        static_epochs: epochs of each static student (``training = static``).
        static_lr: learning rate of the static students.
    """

    name: ClassVar[str] = "proard"
    revision: ClassVar[int] = 1
    presets: ClassVar[dict[str, dict[str, object]]] = {"paper": {}, "smoke": _SMOKE}
    space: str = "resnet"
    training: Literal["progressive", "random", "static"] = "progressive"
    sampling: Literal["batch", "epoch"] = "batch"
    students: tuple[str, ...] = ("smallest", "median", "largest")
    eps: float = 0.031
    attack_steps: int = 10
    attack_step: float = 0.25
    teacher_beta: float = 6.0
    teacher_epochs: int = 120
    teacher_lr: float = 0.1
    teacher_batch_size: int = 128
    teacher_subset: int = 0
    stage_epochs: tuple[int, ...] = (120, 25, 120, 25, 120)
    stage_lr: tuple[float, ...] = (3e-2, 2.5e-3, 7.5e-3, 2.5e-3, 7.5e-3)
    k: tuple[int, ...] = (1, 2, 2, 4, 4)
    adv_weight: float = 5 / 6
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 3e-5
    dropout: float = 0.1
    train_subset: int = 0
    reorganize: bool = True
    candidates: int = 8
    holdout: int = 2000
    search_steps: int = 10
    bn_images: int = 2000
    bn_batch: int = 200
    static_epochs: int = 120
    static_lr: float = 0.1

    def __post_init__(self) -> None:
        n = len(STAGES)
        _check(self.space in SPACES, f"unknown space {self.space!r}; use one of {', '.join(SPACES)}")
        _check(len(self.stage_epochs) == len(self.stage_lr) == len(self.k) == n,
               f"stage_epochs, stage_lr and k need {n} values, one per stage: {', '.join(STAGES)}")  # fmt: skip
        _check(min(self.stage_epochs) >= 0 and sum(self.stage_epochs) > 0, "stage_epochs >= 0, not all 0")
        _check(min(self.k) >= 1 and min(self.stage_lr) > 0, "k >= 1 and stage_lr > 0")
        _check(0 <= self.eps <= 1 and self.attack_steps >= 1 and 0 < self.attack_step <= 1, "eps, attack_step(s)")
        _check(0 <= self.adv_weight <= 1 and 0 <= self.dropout < 1, "adv_weight in [0, 1], dropout in [0, 1)")
        _check(min(self.teacher_epochs, self.static_epochs, self.teacher_batch_size, self.batch_size) >= 1,
               "epochs and batch sizes >= 1")  # fmt: skip
        _check(min(self.teacher_lr, self.static_lr) > 0 and 0 <= self.momentum < 1, "lr > 0, momentum in [0, 1)")
        _check(min(self.candidates, self.bn_images, self.bn_batch, self.search_steps) >= 1, "search sizes >= 1")
        _check(min(self.holdout, self.train_subset, self.teacher_subset) >= 0, "subset sizes >= 0")
        _check(bool(self.students), "students: at least one budget")
        for budget in self.students:
            parse_budget(budget)
        names = self.variant_names()
        _check(len(set(names)) == len(names), f"students name one variant twice: {', '.join(names)}")

    def variant_names(self) -> tuple[str, ...]:
        """One variant per budget: ``smallest``, ``median``, ``largest``, ``macs-<n>``, ``params-<n>``."""
        return tuple(variant_name(b) for b in self.students)

    def teacher_params(self) -> dict[str, object]:
        """The ``trades`` build this ProARD distils from (cached and shared)."""
        return {
            "space": self.space,
            "beta": self.teacher_beta,
            "eps": self.eps,
            "steps": self.attack_steps,
            "step": self.attack_step,
            "epochs": self.teacher_epochs,
            "lr": self.teacher_lr,
            "batch_size": self.teacher_batch_size,
            "train_subset": self.teacher_subset,
        }

    def shrinking(self, eps: float) -> Shrinking:
        """The shrinking plan of these parameters (``eps`` resolved)."""
        return Shrinking(
            epochs=self.stage_epochs,
            lrs=self.stage_lr,
            k=self.k,
            random=self.training == "random",
            sampling=self.sampling,
            attack=(eps, self.attack_step * eps, self.attack_steps),
            adv_weight=self.adv_weight,
            reorganize=self.reorganize,
        )

    def selection(self) -> Selection:
        """The student-selection settings."""
        return Selection(self.candidates, self.holdout, self.search_steps, self.bn_images, self.bn_batch)

    def schedule(self, static: bool = False) -> Schedule:
        """The SGD schedule of a shrinking stage (epochs and lr set per stage) or of a static student."""
        epochs = self.static_epochs if static else 1
        return Schedule(
            epochs=epochs,
            batch_size=self.batch_size,
            lr=self.static_lr if static else self.stage_lr[0],
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            nesterov=self.momentum > 0,
            milestones=step_milestones(epochs) if static else (),
            train_subset=self.train_subset,
        )

    def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """Teacher -> progressive shrinking -> one searched, recalibrated static student per budget."""
        if ctx.get_models is None:
            raise RuntimeError("proard needs the runner's model cache (Context.get_models) for its teacher")
        eps = self.eps or ctx.default_eps
        builder = static_builder(self.space, ctx.shape)
        if self.training == "static":
            return self._fit_static(ctx, eps)
        (teacher,) = ctx.get_models("trades", self.teacher_params()).values()
        teacher = copy.deepcopy(teacher).cpu().eval()
        net = copy.deepcopy(teacher).train()  # the teacher initialises the dynamic network (METHODS.md §4.3)
        net.dropout = self.dropout
        train_ctx, held = split_holdout(ctx, self.holdout)
        shrink(net, teacher.to(ctx.device), train_ctx, self.schedule(), self.shrinking(eps))
        net.cpu().eval()
        held_data = ctx.train.batch(held) if len(held) else None  # indices of ctx.train, not of train_ctx's
        chosen = select(net, self.students, train_ctx, held_data, self.selection(), eps, builder)
        return {variant_name(budget): student for budget, student in chosen.items()}

    def requires(self) -> tuple[robench.PluginSpec, ...]:
        """The ``trades`` teacher; for ``training=static``, the progressive ProARD whose
        students' configurations it trains alone."""
        if self.training == "static":
            return (robench.PluginSpec.of("proard", self._progressive_params()),)
        return (robench.PluginSpec.of("trades", self.teacher_params()),)

    def _progressive_params(self) -> dict[str, object]:
        return {k: v for k, v in self.params().items() if k not in _STATIC_FIELDS}

    def _fit_static(self, ctx: robench.Context, eps: float) -> dict[str, nn.Module]:
        assert ctx.get_models is not None
        progressive = ctx.get_models("proard", self._progressive_params())
        builder = static_builder(self.space, ctx.shape)
        models: dict[str, nn.Module] = {}
        for name in self.variant_names():
            student = progressive[name]
            assert isinstance(student, Student)
            ctx.progress.log(f"proard static {name}: {encode(student.config)}")
            pgd = (eps, self.attack_steps, self.attack_step)
            models[name] = train_static(student.config, builder, ctx, self.schedule(static=True), pgd)
        return models

    def skeletons(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """Largest-configuration students; loading a cached student rebuilds it for its stored configuration."""
        net = build(self.space, ctx.shape)
        builder = static_builder(self.space, ctx.shape)
        largest = dict(net.config)
        return {name: Student(net.extract(), largest, builder) for name in self.variant_names()}

    def variant(self, name: str, model: nn.Module) -> robench.Variant:
        """A static student, its configuration recorded in the row."""
        config = encode(model.config) if isinstance(model, Student) else ""
        return robench.Variant(name=name, model=model, config=config)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
