"""Binary-weight CARDs by biprop (Diffenderfer & Kailkhura 2021, "multi-prize tickets";
METHODS.md §5.2), and the storage encodings of sparse and binary cards.

biprop prunes a *randomly initialised* network without training its weights: every conv
and linear layer keeps its random weights frozen and learns a score per weight; the
forward uses the top ``1 - sparsity`` fraction of each layer's weights by ``|score|``
(edge-popup's per-layer subnetwork), binarised to ``alpha * sign(w)`` with one scale per
layer, ``alpha = mean |w|`` over the kept weights (the L1-optimal scale of a binary
approximation). The top-k selection has no gradient; as in edge-popup the scores receive
the gradient of the mask straight through. Biases stay at their initial values (edge-popup
and biprop train only scores). After training, :func:`bake` writes the effective weights
(exact zeros, and +-alpha) into a plain module of the architecture.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from robench.plugins.card.prune import prunable


class _TopK(torch.autograd.Function):
    """0/1 mask of the ``k`` largest entries; straight-through gradient (edge-popup)."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, k: int) -> Tensor:
        mask = torch.zeros_like(scores)
        mask.view(-1)[scores.flatten().topk(k).indices] = 1.0
        return mask

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class BipropWeight(nn.Module):
    """The parametrization ``w -> alpha * sign(w) * mask(|scores|)`` of one layer's weight."""

    def __init__(self, weight: Tensor, keep: float, gen: torch.Generator) -> None:
        super().__init__()
        self.k = max(1, round(keep * weight.numel()))
        # Kaiming-uniform scores, as edge-popup initialises them
        bound = math.sqrt(6.0 / weight[0].numel())
        self.scores = nn.Parameter((torch.rand(weight.shape, generator=gen) * 2 - 1) * bound)

    def forward(self, weight: Tensor) -> Tensor:
        """The effective binary weight."""
        mask = _TopK.apply(self.scores.abs(), self.k)
        alpha = (weight.abs() * mask).sum() / mask.sum()
        return alpha * weight.sign() * mask


def biprop(model: nn.Module, sparsity: float, gen: torch.Generator) -> nn.Module:
    """Freeze ``model``'s parameters and parametrize each conv/linear weight for biprop, in place."""
    model.requires_grad_(False)
    for _, layer in prunable(model):
        parametrize.register_parametrization(layer, "weight", BipropWeight(layer.weight, 1.0 - sparsity, gen))
    return model


def bake(model: nn.Module) -> nn.Module:
    """Replace every biprop parametrization by its current effective weight, in place."""
    for _, layer in prunable(model):
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    model.requires_grad_(True)
    return model


# -- storage encodings ------------------------------------------------------------------

BITMAP_FP32 = "bitmap-fp32"
"""Sparse float encoding: per conv/linear weight tensor a 1-bit-per-entry occupancy bitmap
plus the non-zero values as fp32, in bitmap order; every other tensor dense fp32."""
BITMAP_SIGN = "bitmap-sign"
"""Sparse binary encoding: per conv/linear weight tensor the occupancy bitmap, one sign bit
per non-zero and one fp32 scale; every other tensor dense fp32."""


def encoded_bytes(model: nn.Module, encoding: str) -> int:
    """Bytes of ``model``'s parameters (and buffers: a deck's signatures) in ``encoding``."""
    weights = {id(layer.weight) for _, layer in prunable(model)}
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        n = tensor.numel()
        if id(tensor) not in weights:
            total += 4 * n
            continue
        nonzero = int(torch.count_nonzero(tensor))
        values = 4 * nonzero if encoding == BITMAP_FP32 else math.ceil(nonzero / 8) + 4
        total += math.ceil(n / 8) + values
    return total
