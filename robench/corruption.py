"""The contract for common-corruption plugins (the ``corruption`` threat, DESIGN.md §2).

A corruption is an :class:`~robench.attack.Attack` that ignores the model: it maps clean
images to one corrupted copy at one severity, drawing every random number from the
per-sample keys it is given, so a sample's corrupted copy is the same whatever its batch.
The ``corruptions`` protocol lists one use per (corruption, severity); the runner generates
each set once from the clean evaluation subset, caches it, and scores every defense on it
(robench/execute/corruption.py). Severity 0 is the clean input, by definition.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from robench.attack import Attack
from robench.context import Norm, Threat

STANDARD_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
"""The 15 corruptions of CIFAR-10-C / ImageNet-C (Hendrycks & Dietterich 2019), named as the
files of the released CIFAR-10-C folder (``<name>.npy``) and in the order of its generator."""

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
"""The standard severities; RobustBench's corruption metric averages over 15 x 5 sets."""


@dataclass(frozen=True, kw_only=True)
class Corruption(Attack):
    """Base class of corruption plugins: one corruption at one severity.

    Args:
        corruption: which corruption (one of :data:`STANDARD_CORRUPTIONS` for the built-in).
        severity: 0 (identity) to 5.
    """

    norms: ClassVar[frozenset[Norm]] = frozenset({"corruption"})
    score_based: ClassVar[bool] = True  # no gradient: the masking diagnosis has nothing to add
    corruption: str = "gaussian_noise"
    severity: int = 1

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, threat: Threat, keys: Tensor) -> Tensor:
        """The corrupted copy of ``x`` (``model`` and ``y`` are not used); ``x`` itself at severity 0."""
        if self.severity == 0:
            return x.clone()
        return self.corrupt(x, keys).clamp(0, 1)

    @abstractmethod
    def corrupt(self, x: Tensor, keys: Tensor) -> Tensor:
        """The corrupted copy of ``x`` (NCHW in [0, 1]) at ``severity`` >= 1.

        :param keys: one int64 seed per sample; every random draw for sample ``i`` comes from
            ``keys[i]`` (:func:`robench.sample_uniform`, :func:`robench.sample_normal`)
        """
