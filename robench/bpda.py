"""BPDA: gradient attacks through a defense's non-differentiable input transformation.

Backward Pass Differentiable Approximation (Athalye, Carlini & Wagner 2018, §4.1): run the
transformation on the forward pass, and on the backward pass pretend it was the identity,
or differentiate a smooth substitute the defense gives instead. It is what breaks input
rounding, JPEG and similar "gradient obfuscating layers", which otherwise leave a zero or
missing input gradient and a robustness number that only measures the attack's failure.

:class:`BPDA` follows advertorch's ``BPDAWrapper`` (``advertorch/bpda.py``): the identity
backward, or ``forwardsub`` re-run on detached inputs with grad enabled and differentiated
with ``torch.autograd.grad``. It wraps one input transformation, not a whole model: for a
model with no gradient path at all, the only BPDA-style substitute is another model, which
is a transfer attack (advertorch issue #98); robench's model checks add that one themselves.

A defense declares the transformation on its variant (``Variant(..., preprocess=...)``);
:func:`with_preprocess` composes it with the network for prediction, and with :class:`BPDA`
for the model gradient attacks differentiate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from robench.defense import Variant


class _Straight(torch.autograd.Function):
    """The transformation forward; the identity or the substitute's vector-Jacobian product backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, transform: nn.Module, substitute: nn.Module | None) -> Tensor:
        ctx.substitute = substitute
        ctx.save_for_backward(x)
        out: Tensor = transform(x)
        if substitute is None and out.shape != x.shape:
            raise ValueError(
                f"BPDA's identity backward needs the transformation to keep the input's shape, but "
                f"{type(transform).__name__} maps {tuple(x.shape)} to {tuple(out.shape)}: give a differentiable "
                "substitute (Variant(preprocess_substitute=...))"
            )
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        if ctx.substitute is None:
            return grad_out, None, None
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(ctx.substitute(x), x, grad_out)
        return grad, None, None


class BPDA(nn.Module):
    """``transform`` on the forward pass; on the backward pass the identity, or the gradient
    of ``substitute`` (a differentiable approximation of ``transform``) at the same input.

    Use it inside a model to attack through one non-differentiable layer; a defense whose
    transformation sits before its network declares it as ``Variant.preprocess`` instead,
    and robench inserts this module for gradient attacks.

    :param transform: the transformation; its own gradient is never used
    :param substitute: its differentiable stand-in for the backward pass; ``None``: identity
    """

    def __init__(self, transform: nn.Module, substitute: nn.Module | None = None) -> None:
        super().__init__()
        self.transform, self.substitute = transform, substitute

    def forward(self, x: Tensor) -> Tensor:
        """``transform(x)``, with the BPDA backward."""
        out: Tensor = _Straight.apply(x, self.transform, self.substitute)
        return out


class Preprocessed(nn.Module):
    """``model(preprocess(x))``: a variant's prediction, or (with a :class:`BPDA` as
    ``preprocess``) the model gradient attacks differentiate."""

    def __init__(self, preprocess: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.preprocess, self.model = preprocess, model

    def forward(self, x: Tensor) -> Tensor:
        """The model's output on the transformed input."""
        out: Tensor = self.model(self.preprocess(x))
        return out


def with_preprocess(variant: Variant) -> Variant:
    """The variant as robench evaluates it when it declares ``preprocess``: ``model`` predicts
    through the transformation, and ``grad_model`` is the attacked model behind a
    :class:`BPDA` of it. A variant without one, or already composed, is returned as is (the
    declaration stays on it, for the row's ``bpda`` column)."""
    if variant.preprocess is None or _composed(variant):
        return variant
    return dataclasses.replace(
        variant,
        model=Preprocessed(variant.preprocess, variant.model),
        grad_model=Preprocessed(BPDA(variant.preprocess, variant.preprocess_substitute), variant.attack_model),
    )


def bpda_column(variant: Variant) -> str:
    """How gradient attacks crossed the variant's preprocessing: ``""`` (none declared),
    ``identity``, or ``substitute <class name>``."""
    if variant.preprocess is None:
        return ""
    sub = variant.preprocess_substitute
    return "identity" if sub is None else f"substitute {type(sub).__name__}"


def _composed(variant: Variant) -> bool:
    """Whether :func:`with_preprocess` already put the variant's transformation in front of its model."""
    return isinstance(variant.model, Preprocessed) and variant.model.preprocess is variant.preprocess
