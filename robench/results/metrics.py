"""Pure functions that turn per-sample outcomes into the numbers robench reports."""

from __future__ import annotations

import math

import torch
from torch import Tensor

WILSON_Z = 1.959963984540054  # 95 % two-sided


def wilson_interval(successes: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95 % by default).

    Written here (five lines) rather than pulling in statsmodels for one formula.
    """
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def all_or_nothing(clean_correct: Tensor, version_correct: Tensor) -> Tensor:
    """Per-sample robustness: correct on the clean input and under every version.

    :param clean_correct: bool (n,)
    :param version_correct: bool (versions, n); entries for samples a version skipped
        (early exit) must be ``True`` or ``False`` consistently with what was already known:
        the runner passes ``False`` only where a version really fooled the sample
    """
    if version_correct.numel() == 0:
        return clean_correct.clone()
    return clean_correct & version_correct.all(dim=0)


def accuracy(correct: Tensor) -> float:
    """Mean of a bool tensor, as a float."""
    return float(correct.float().mean()) if correct.numel() else float("nan")


def count(correct: Tensor) -> int:
    """Number of ``True`` entries."""
    return int(torch.count_nonzero(correct))
