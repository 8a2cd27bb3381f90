"""Per-sample attack losses (to be maximised). Summed, never averaged, by the attacks:
a mean would tie each sample's gradient scale to the batch size."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LossName = Literal["ce", "cw"]
LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy."""
    return F.cross_entropy(logits, y, reduction="none")


def cw_margin(logits: Tensor, y: Tensor, confidence: float = 0.1) -> Tensor:
    """Per-sample CW margin loss ``-relu(z_y - max_{j != y} z_j + confidence)``.

    DVERGE's form (confidence 0.1 by default, METHODS.md §1.2): it stops pushing a sample
    once it is misclassified by ``confidence``. Written here because torchattacks' CW is the
    L2 optimisation attack, not this loss for PGD.
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return -torch.clamp(true - others.amax(dim=1) + confidence, min=0)


def get_loss(name: LossName, confidence: float = 0.1) -> LossFn:
    """The loss function called ``name`` (``ce`` or ``cw``)."""
    if name == "ce":
        return cross_entropy
    return lambda logits, y: cw_margin(logits, y, confidence)
