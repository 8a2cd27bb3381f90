"""Unstructured magnitude pruning with masks, for lottery-ticket compression (METHODS.md §5.2).

Built on :mod:`torch.nn.utils.prune`, the library lottery-ticket code uses: a pruned layer
keeps ``weight_orig`` (trained) and the buffer ``weight_mask``, and its forward uses
``weight_orig * weight_mask``. Masks are therefore part of the ``state_dict``: they survive
a checkpoint of :func:`robench.train` and its resume, and rewinding writes ``weight_orig``
only. :func:`keep_masks` runs after every optimizer step so that ``weight_orig`` is zero
where the mask is (momentum and weight decay would otherwise move pruned entries that the
forward ignores, and the next round's magnitudes would see them).

Every round prunes by magnitude (L1) among the weights still alive, globally over every
conv and linear weight (Frankle & Carbin's large-network setting, and the usual LRR
setting) or per layer (the same fraction in each). Counts are exact: after round ``r`` of
``R`` a scope keeps ``round(n * (1 - sparsity) ** (r / R))`` weights, so the last round
hits the target sparsity to the weight, whatever the per-round rounding.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

Scope = Literal["global", "layer"]
PRUNABLE = (nn.Conv2d, nn.Linear)
"""Layers whose weights are pruned (biases and normalisation parameters stay dense)."""


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The named conv and linear layers of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE)]


def effective_weight(module: nn.Module) -> Tensor:
    """The weight the layer computes with: ``weight_orig * weight_mask`` when pruned.

    ``module.weight`` itself is recomputed by a forward pre-hook, so after an optimizer
    step it is stale until the next forward; this reads the current tensors.
    """
    if prune.is_pruned(module) and hasattr(module, "weight_mask"):
        return module.weight_orig.detach() * module.weight_mask
    return module.weight.detach()


def mask_of(module: nn.Module) -> Tensor:
    """The layer's 0/1 mask (all ones for a layer not pruned yet)."""
    mask = getattr(module, "weight_mask", None)
    return mask if mask is not None else torch.ones_like(module.weight)


def masks(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every prunable layer's mask, by layer name."""
    return {name: mask_of(m).detach().clone() for name, m in prunable(model)}


def alive(model: nn.Module) -> tuple[int, int]:
    """(unmasked weights, all weights) over the prunable layers."""
    layers = prunable(model)
    return sum(int(mask_of(m).sum()) for _, m in layers), sum(m.weight.numel() for _, m in layers)


def sparsity(model: nn.Module) -> float:
    """Fraction of prunable weights that are masked (or exactly zero, once made permanent)."""
    layers = prunable(model)
    zero = sum(int((effective_weight(m) == 0).sum()) for _, m in layers)
    return zero / sum(m.weight.numel() for _, m in layers)


def kept_after(total: int, target: float, round_: int, rounds: int) -> int:
    """Weights a scope of ``total`` keeps after ``round_`` of ``rounds`` toward ``target``."""
    return round(total * (1.0 - target) ** (round_ / rounds))


def prune_round(model: nn.Module, target: float, round_: int, rounds: int, scope: Scope) -> None:
    """Prune ``model`` in place by magnitude to round ``round_``'s share of ``target`` sparsity.

    Only weights still alive compete (torch's pruning containers combine the new mask with
    the old one), so a weight pruned in an earlier round never comes back.
    """
    layers = prunable(model)
    if scope == "global":
        n_alive, n_total = alive(model)
        amount = n_alive - kept_after(n_total, target, round_, rounds)
        prune.global_unstructured(
            [(m, "weight") for _, m in layers],
            pruning_method=prune.L1Unstructured,
            # the current weights, not the stale `weight` attribute (see effective_weight)
            importance_scores={(m, "weight"): effective_weight(m) for _, m in layers},
            amount=max(amount, 0),
        )
    else:
        for _, m in layers:
            amount = int(mask_of(m).sum()) - kept_after(m.weight.numel(), target, round_, rounds)
            prune.l1_unstructured(m, "weight", amount=max(amount, 0), importance_scores=effective_weight(m))
    keep_masks(model)


def keep_masks(model: nn.Module) -> None:
    """Zero ``weight_orig`` wherever the mask is zero (the ``after_step`` of every round)."""
    with torch.no_grad():
        for _, m in prunable(model):
            if prune.is_pruned(m) and hasattr(m, "weight_mask"):
                m.weight_orig.mul_(m.weight_mask)


def weights_of(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every parameter, by name, with pruned layers' ``weight_orig`` as ``weight``:
    what lottery-ticket rewinding restores (LTH's initialisation)."""
    out = {}
    for name, value in model.named_parameters():
        out[name.removesuffix("_orig") if name.endswith("weight_orig") else name] = value.detach().clone()
    return out


def rewind_weights(model: nn.Module, saved: Mapping[str, Tensor]) -> None:
    """Restore every parameter from ``saved`` (see :func:`weights_of`), keeping the masks."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = name.removesuffix("_orig") if name.endswith("weight_orig") else name
            param.copy_(saved[key])
    keep_masks(model)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every mask into its weight (``prune.remove``): a plain module with exact zeros,
    whose ``state_dict`` loads into a fresh model of the architecture."""
    for _, m in prunable(model):
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")
    return model


def pruned_layers(model: nn.Module) -> Iterator[nn.Module]:
    """The prunable layers that currently carry a mask."""
    return (m for _, m in prunable(model) if hasattr(m, "weight_mask"))
