"""DVERGE's transfer attacks (METHODS.md §1.2): momentum PGD, M-DI2-FGSM and SGM.

torchattacks' MI-FGSM and DI2-FGSM draw random starts and transforms per batch from the
global generator, so a sample's result would depend on its batch (DESIGN.md §5), and it
has no SGM. Written here is what it lacks: the keyed momentum iteration (plugins/_keyed.py's
KeyedIterative: KeyedPGD plus MI-FGSM momentum, a per-iteration input transform and EOT
averaging, which plugins/zoo.py's EOT-PGD reuses), :class:`InputDiversity` (Xie et al.'s
resize-and-pad, keyed per sample and iteration, batched through ``grid_sample``) and
:func:`skip_gradients` (SGM's backward hooks). Step, projection and clipping are
torchattacks' MIFGSM; a test checks they agree exactly. These attacks run every step on
the surrogate (no ``stop_on_success``): a higher surrogate loss transfers better.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robench
from robench import LossName, Norm, sample_uniform
from robench.plugins.pgd import engine_settings

if TYPE_CHECKING:
    from robench.plugins._keyed import Transform
Grads = tuple[Tensor | None, ...]
BackwardHook = Callable[[nn.Module, Grads, Grads], Grads]

# Offset added to the keys for the input-diversity draws, so they form a stream independent
# of the random start, which random_start draws from the keys themselves.
_DIVERSITY_STREAM = 7919


# -- Input diversity (M-DI2-FGSM) ----------------------------------------------------


def resize_pad(x: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """Each image shrunk into a zero canvas and resampled back to its own size, batched.

    :param x: images, NCHW
    :param scale: (N, 2) image size as a fraction of the canvas, (height, width), in (0, 1]
    :param offset: (N, 2) top-left corner of the image in the canvas, as fractions of it
    :returns: ``x``'s shape; the identity for scale 1 and offset 0

    One bilinear ``grid_sample`` with a per-sample affine map, so the whole batch takes one
    forward pass and gradients flow to ``x``.
    """
    # affine_grid maps output coordinates u in [-1, 1] (spanning the canvas) to input
    # coordinates v; the image covers canvas fractions [off, off + scale], so
    # v = (u + 1 - 2 off) / scale - 1. Points outside the image sample the zero padding.
    theta = x.new_zeros(x.shape[0], 2, 3)
    for row, axis in ((0, 1), (1, 0)):  # theta's rows are (x = width, y = height)
        theta[:, row, row] = 1 / scale[:, axis]
        theta[:, row, 2] = (1 - 2 * offset[:, axis]) / scale[:, axis] - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class InputDiversity:
    """Xie et al.'s random resize-and-pad, drawn per sample and per iteration from keys.

    At iteration ``t`` sample ``i`` is transformed with probability ``prob``: resized to
    ``rnd`` in [H, ceil(H * resize_rate)) (32..35 for CIFAR at 1.125), placed at a random
    integer offset in a zero canvas of size ceil(H * resize_rate), and resampled to H x W.
    """

    apply: Tensor  # (N, steps) bool
    scale: Tensor  # (N, steps, 2) image size / canvas size, (height, width)
    offset: Tensor  # (N, steps, 2) top-left offset / canvas size, (height, width)

    @classmethod
    def draw(cls, keys: Tensor, x: Tensor, steps: int, prob: float, resize_rate: float) -> InputDiversity:
        """All iterations' parameters, four uniform draws per sample and iteration."""
        u = sample_uniform(keys + _DIVERSITY_STREAM, torch.Size([steps, 4]), 0.0, 1.0)
        sizes = torch.tensor(x.shape[-2:], dtype=torch.float32)
        canvas = torch.ceil(sizes * resize_rate)
        # One size draw for both axes keeps the aspect ratio (up to rounding).
        rnd = sizes + torch.floor(u[..., 1:2] * (canvas - sizes))
        room = canvas - rnd
        corner = torch.minimum(torch.floor(u[..., 2:4] * (room + 1)), room)  # 0..room, inclusive
        return cls(apply=(u[..., 0] < prob).to(x.device), scale=(rnd / canvas).to(x), offset=(corner / canvas).to(x))

    def __call__(self, x: Tensor, step: int, index: Tensor) -> Tensor:
        """``x`` (the samples at ``index``) with iteration ``step``'s transform where drawn."""
        apply = self.apply[index, step]
        if not bool(apply.any()):
            return x
        out = resize_pad(x, self.scale[index, step], self.offset[index, step])
        return torch.where(apply.view(-1, *([1] * (x.ndim - 1))), out, x)


# -- Skip gradients (SGM) ------------------------------------------------------------


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """Every submodule with a ``residual`` branch and a ``shortcut`` (robench's BasicBlock)."""
    return [m for m in model.modules() if hasattr(m, "residual") and hasattr(m, "shortcut")]


@contextmanager
def skip_gradients(model: nn.Module, gamma: float) -> Iterator[None]:
    """Within the block, backward passes scale the gradient through every residual branch by gamma.

    The input gradient then weighs each path through the network by gamma per residual
    branch it crosses, favouring the skip connections (Wu et al. 2020). Only the branch is
    scaled, never the post-addition ReLU: that ReLU lies on every path, so scaling it would
    multiply the whole gradient by one positive constant, which a sign step (or an
    L2-normalised step) ignores. (SGM's reference code hooks every ReLU, but torchvision's
    BasicBlock uses one ReLU module twice, so the branch/shortcut ratio is gamma there too.)

    :raises ValueError: when ``model`` has no residual blocks
    """
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError(
            f"sgm needs a residual network (e.g. resnet20, resnet18): {type(model).__name__} has no residual blocks"
        )
    handles = [block.get_submodule("residual").register_full_backward_hook(_scaled_by(gamma)) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _scaled_by(gamma: float) -> BackwardHook:
    """A full backward hook returning the module's input gradients times ``gamma``."""

    def hook(module: nn.Module, grad_input: Grads, grad_output: Grads) -> Grads:
        return tuple(None if g is None else g * gamma for g in grad_input)

    return hook


# -- The attacks -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MIFGSM(robench.Attack):
    """Momentum iterative FGSM (Dong et al. 2018): DVERGE's momentum PGD with keyed random starts.

    Distance measure: Linf.
    Each step adds ``step_size * eps * sign(g)``, where ``g`` accumulates the per-sample
    L1-normalised gradient with decay ``decay``. Equals ``torchattacks.MIFGSM`` without
    random start, with cross-entropy. DVERGE's 3 "random starts" (METHODS.md §1.2) are 3
    versions from uniform starts, which torchattacks' and advertorch's MI-FGSM lack.

    Args:
        steps: number of gradient steps.
        step_size: step size as a fraction of eps (0.2 = eps/5, as in DVERGE).
        decay: momentum decay factor mu.
        random_start: start each restart at a uniform random point of the eps-ball.
        restarts: number of random restarts; each is a separate version.
        loss: ``ce`` (cross-entropy) or ``cw`` (CW margin).
        confidence: the CW margin's confidence.
    """

    name: ClassVar[str] = "mifgsm"
    norms: ClassVar[frozenset[Norm]] = frozenset({"linf"})
    steps: int = 100
    step_size: float = 0.2
    decay: float = 1.0
    random_start: bool = True
    restarts: int = 3
    loss: LossName = "ce"
    confidence: float = 0.1

    def __post_init__(self) -> None:
        if self.steps < 1 or self.restarts < 1:
            raise ValueError("steps and restarts must be >= 1")
        if self.step_size <= 0 or self.decay < 0:
            raise ValueError("step_size must be > 0 and decay >= 0")

    def n_versions(self) -> int:
        """One version per restart (only one without random start: restarts would be equal)."""
        return self.restarts if self.random_start else 1

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, threat: robench.Threat, keys: Tensor) -> Tensor:
        """Run momentum PGD from the per-sample start given by ``keys``."""
        from robench.plugins._keyed import KeyedIterative  # torchattacks: imported when an attack runs

        attack = KeyedIterative(
            model, **engine_settings(self, x, threat, keys), decay=self.decay, transform=self._transform(x, keys)
        )
        out: Tensor = attack(x, y)
        return out

    def _transform(self, x: Tensor, keys: Tensor) -> Transform | None:
        """The input transform applied at each iteration: none for plain MI-FGSM."""
        return None


@dataclass(frozen=True, kw_only=True)
class MDI2FGSM(MIFGSM):
    """M-DI2-FGSM (Xie et al. 2019): MI-FGSM through a random resize-and-pad at every iteration.

    Distance measure: Linf.
    At every iteration each sample is, with probability ``prob``, resized to ``rnd`` in
    [H, ceil(H * resize_rate)), placed at a random offset in a zero canvas of that size and
    resampled to H x W before the forward pass; the gradient flows through the transform.
    The transform is drawn per sample and per iteration from the runner's keys (torchattacks'
    DIFGSM draws one transform per batch from the global generator). With ``prob=0`` it is
    :class:`MIFGSM`.

    Args:
        steps: number of gradient steps.
        step_size: step size as a fraction of eps (0.2 = eps/5, as in DVERGE).
        decay: momentum decay factor mu.
        prob: probability of transforming a sample at an iteration (DVERGE: 0.5).
        resize_rate: canvas size as a multiple of the image size (> 1).
        random_start: start at a uniform random point of the eps-ball.
        restarts: number of versions; they differ through their transforms (and starts).
        loss: ``ce`` (cross-entropy) or ``cw`` (CW margin).
        confidence: the CW margin's confidence.
    """

    name: ClassVar[str] = "mdi2fgsm"
    prob: float = 0.5
    resize_rate: float = 1.125
    random_start: bool = False
    restarts: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.prob <= 1:
            raise ValueError("prob must be in [0, 1]")
        if self.resize_rate <= 1:
            raise ValueError("resize_rate must be > 1")

    def n_versions(self) -> int:
        """One version per restart, unless nothing is random (then restarts would be equal)."""
        return self.restarts if self.random_start or self.prob > 0 else 1

    def _transform(self, x: Tensor, keys: Tensor) -> Transform | None:
        """The keyed per-iteration resize-and-pad."""
        return InputDiversity.draw(keys, x, self.steps, self.prob, self.resize_rate)


@dataclass(frozen=True, kw_only=True)
class SGM(robench.Attack):
    """Skip Gradient Method (Wu et al. 2020): PGD whose backward pass favours skip connections.

    Distance measure: Linf or L2.
    I-FGSM / PGD without random start or momentum, where the gradient through every
    residual branch is multiplied by ``gamma`` on the way back (see :func:`skip_gradients`).
    Needs a residual network: blocks are the submodules with ``residual`` and ``shortcut``
    (robench's BasicBlock, as in resnet20 and resnet18). With ``gamma=1`` it is PGD.

    Args:
        steps: number of gradient steps.
        step_size: step size as a fraction of eps (0.2 = eps/5, as in DVERGE).
        gamma: gradient factor on the residual branches, in (0, 1] (DVERGE: 0.2).
        loss: ``ce`` (cross-entropy) or ``cw`` (CW margin).
        confidence: the CW margin's confidence.
    """

    name: ClassVar[str] = "sgm"
    norms: ClassVar[frozenset[Norm]] = frozenset({"linf", "l2"})
    steps: int = 100
    step_size: float = 0.2
    gamma: float = 0.2
    loss: LossName = "ce"
    confidence: float = 0.1

    def __post_init__(self) -> None:
        if self.steps < 1 or self.step_size <= 0:
            raise ValueError("steps must be >= 1 and step_size > 0")
        if not 0 < self.gamma <= 1:
            raise ValueError("gamma must be in (0, 1]")

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, threat: robench.Threat, keys: Tensor) -> Tensor:
        """PGD from the clean input with skip-gradient hooks in place (nothing is random)."""
        from robench.plugins._keyed import KeyedPGD

        attack = KeyedPGD(model, **engine_settings(self, x, threat, keys))  # SGM: no random start
        with skip_gradients(model, self.gamma):
            out: Tensor = attack(x, y)
        return out


@robench.hookimpl
def robench_attacks() -> list[type[robench.Attack]]:
    """MI-FGSM, M-DI2-FGSM and SGM."""
    return [MIFGSM, MDI2FGSM, SGM]


__all__ = [
    "MDI2FGSM",
    "MIFGSM",
    "SGM",
    "InputDiversity",
    "residual_blocks",
    "resize_pad",
    "skip_gradients",
]
