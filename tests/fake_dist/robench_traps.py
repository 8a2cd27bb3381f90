"""Third-party defenses that hide the classic evaluation traps (tests of robench's model checks).

Written as a plugin author would, from the README and the public ``robench`` API only. Each
defense wraps the ``baseline`` model of the same dataset and architecture (trained through
the runner's model cache) and breaks exactly one rule:

* ``trap-rounding``: rounds inputs to 3 bits, so input gradients are zero almost everywhere;
* ``trap-noise``: adds Gaussian input noise without declaring the variant randomized;
* ``trap-softmax``: returns probabilities instead of logits;
* ``trap-classes``: returns 7 outputs on a 10-class dataset (4 on the 4-class tiny one: one less);
* ``trap-tuple``: returns ``(logits, features)``;
* ``trap-batchnorm``: normalises inputs by the statistics of their batch (a BatchNorm that
  stays in training mode);
* ``trap-nograd``: runs an input-sanitising step under ``torch.no_grad()``, so no gradient
  reaches the input (the output still has a graph, through the weights);
* ``trap-onehot``: returns the one-hot of its prediction as logits (no graph at all);
* ``trap-rounding-bpda``: the 3-bit input rounding of ``trap-rounding``, declared as the
  variant's ``preprocess`` (so robench attacks through it by BPDA) instead of hidden in the model.

Register with ``pm.register(robench_traps, name="traps")``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robench


class _Wrapper(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class Round(nn.Module):
    """Inputs rounded to 8 grey levels (3 bits): the round has zero gradient almost everywhere."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.round(x * 7) / 7


class Rounding(_Wrapper):
    """Inputs rounded to 8 grey levels inside the model."""

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.model(Round()(x))
        return out


class NoGradSanitise(_Wrapper):
    """Inputs clamped to [0, 1] under ``torch.no_grad()``: harmless to predictions, fatal to gradients."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            x = x.clamp(0, 1)
        out: Tensor = self.model(x)
        return out


class OneHot(_Wrapper):
    """The one-hot of the prediction, as floats."""

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.model(x)
        return F.one_hot(logits.argmax(dim=1), logits.shape[1]).float()


class GaussianNoise(_Wrapper):
    """Gaussian input noise (sigma 0.2) from the global generator, at every prediction."""

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.model((x + 0.2 * torch.randn_like(x)).clamp(0, 1))
        return out


class Softmax(_Wrapper):
    """Probabilities out."""

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.model(x).softmax(dim=1)
        return out


class DropClasses(_Wrapper):
    """All logits but the last three (one less than the classes on tiny 4-class data)."""

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.model(x)
        keep = 7 if logits.shape[1] == 10 else logits.shape[1] - 1
        return logits[:, :keep]


class WithFeatures(_Wrapper):
    """``(logits, features)``, as many research models return."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.model(x), x.flatten(1)


class BatchStatistics(_Wrapper):
    """A BatchNorm on the input that ``eval()`` does not reach."""

    def __init__(self, model: nn.Module, channels: int) -> None:
        super().__init__(model)
        self.norm = nn.BatchNorm2d(channels, affine=False)

    def train(self, mode: bool = True) -> BatchStatistics:
        super().train(mode)
        self.norm.train(True)  # the bug: batch statistics at prediction time
        return self

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.model(0.5 + 0.25 * self.norm(x))
        return out


@dataclass(frozen=True, kw_only=True)
class _Trap(robench.Defense):
    """Wraps the ``baseline`` model.

    Args:
        train_subset: the baseline's training subset (0 = its preset's).
        epochs: the baseline's epochs (0 = its preset's).
        batch_size: the baseline's batch size (0 = its preset's).
        lr: the baseline's learning rate (0 = its preset's).
    """

    wrapper: ClassVar[type[_Wrapper]]
    train_subset: int = 0
    epochs: int = 0
    batch_size: int = 0
    lr: float = 0.0

    def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """The baseline model, wrapped."""
        assert ctx.get_models is not None
        params = {k: v for k, v in vars(self).items() if v}
        (model,) = ctx.get_models("baseline", params).values()
        return {"model": self.wrap(copy.deepcopy(model), ctx)}

    def skeletons(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """A wrapped fresh model."""
        return {"model": self.wrap(ctx.new_model(), ctx)}

    def wrap(self, model: nn.Module, ctx: robench.Context) -> nn.Module:
        """The trap around ``model``."""
        return self.wrapper(model).eval()


@dataclass(frozen=True, kw_only=True)
class TrapRounding(_Trap):
    """Baseline behind 3-bit input rounding."""

    name: ClassVar[str] = "trap-rounding"
    wrapper: ClassVar[type[_Wrapper]] = Rounding


@dataclass(frozen=True, kw_only=True)
class TrapNoise(_Trap):
    """Baseline behind undeclared Gaussian input noise."""

    name: ClassVar[str] = "trap-noise"
    wrapper: ClassVar[type[_Wrapper]] = GaussianNoise


@dataclass(frozen=True, kw_only=True)
class TrapSoftmax(_Trap):
    """Baseline returning probabilities."""

    name: ClassVar[str] = "trap-softmax"
    wrapper: ClassVar[type[_Wrapper]] = Softmax


@dataclass(frozen=True, kw_only=True)
class TrapClasses(_Trap):
    """Baseline returning too few outputs."""

    name: ClassVar[str] = "trap-classes"
    wrapper: ClassVar[type[_Wrapper]] = DropClasses


@dataclass(frozen=True, kw_only=True)
class TrapTuple(_Trap):
    """Baseline returning (logits, features)."""

    name: ClassVar[str] = "trap-tuple"
    wrapper: ClassVar[type[_Wrapper]] = WithFeatures


@dataclass(frozen=True, kw_only=True)
class TrapBatchNorm(_Trap):
    """Baseline behind a BatchNorm stuck in training mode."""

    name: ClassVar[str] = "trap-batchnorm"
    wrapper: ClassVar[type[_Wrapper]] = BatchStatistics

    def wrap(self, model: nn.Module, ctx: robench.Context) -> nn.Module:
        """The BatchNorm needs the channel count."""
        return BatchStatistics(model, ctx.shape.channels).eval()


@dataclass(frozen=True, kw_only=True)
class TrapNoGrad(_Trap):
    """Baseline behind an input-sanitising step run without gradient."""

    name: ClassVar[str] = "trap-nograd"
    wrapper: ClassVar[type[_Wrapper]] = NoGradSanitise


@dataclass(frozen=True, kw_only=True)
class TrapOneHot(_Trap):
    """Baseline returning the one-hot of its prediction."""

    name: ClassVar[str] = "trap-onehot"
    wrapper: ClassVar[type[_Wrapper]] = OneHot


@dataclass(frozen=True, kw_only=True)
class TrapRoundingBPDA(_Trap):
    """Baseline behind 3-bit input rounding, declared as the variant's preprocessing."""

    name: ClassVar[str] = "trap-rounding-bpda"
    wrapper: ClassVar[type[_Wrapper]] = _Wrapper

    def wrap(self, model: nn.Module, ctx: robench.Context) -> nn.Module:
        """The baseline itself: the rounding is declared on the variant, not hidden in the model."""
        return model.eval()

    def variant(self, name: str, model: nn.Module) -> robench.Variant:
        """Predict through the rounding; robench attacks through it by BPDA (identity backward)."""
        return robench.Variant(name=name, model=model, preprocess=Round())


TRAPS: dict[str, str] = {
    "trap-rounding": "vanishing_gradients",
    "trap-noise": "undeclared_randomness",
    "trap-softmax": "probability_outputs",
    "trap-batchnorm": "batch_dependent",
}
"""The defenses that evaluate, and the one check each must fire (the other two are error rows)."""
GRADIENT_TRAPS: dict[str, str] = {
    "trap-nograd": "no_gradient_path",
    "trap-onehot": "probability_outputs,no_gradient_path",  # one-hot rows are >= 0 and sum to 1
    "trap-rounding-bpda": "ok",
}
"""The traps of a model's gradient path (issue 22), and the ``checks`` column each must give."""


@robench.hookimpl
def robench_defenses() -> list[type[robench.Defense]]:
    """The trap defenses."""
    return [
        TrapRounding,
        TrapNoise,
        TrapSoftmax,
        TrapClasses,
        TrapTuple,
        TrapBatchNorm,
        TrapNoGrad,
        TrapOneHot,
        TrapRoundingBPDA,
    ]
