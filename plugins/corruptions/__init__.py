"""Common corruptions (CIFAR-10-C / ImageNet-C, Hendrycks & Dietterich 2019) and the ``corruptions`` protocol.

The ``corruption`` plugin is a :class:`robench.Corruption`: one of the 15 standard
corruptions at one severity, batched, every random draw from the per-sample keys
(functions.py), with CIFAR-10-C's parameters for 32x32 colour images and derived ones for
28x28 grey images (params.py). The ``corruptions`` protocol is the 15 x 5 sets RobustBench
scores CARD models on; robench generates each set once from the clean evaluation subset and
caches it, or reads the released CIFAR-10-C arrays when ``$ROBENCH_DATA`` holds them
(robench/execute/corruption.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

import robench
from robench import SEVERITIES, STANDARD_CORRUPTIONS, AttackUse, ConfigError, PluginSpec, Protocol, ProtocolDef


@dataclass(frozen=True, kw_only=True)
class StandardCorruption(robench.Corruption):
    """One of the 15 standard corruptions at one severity (CIFAR-10-C parameters; 28x28 grey derived).

    Threat: ``corruption`` (no radius). Severity 0 returns the clean input.

    Args:
        corruption: gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur,
            motion_blur, zoom_blur, snow, frost, fog, brightness, contrast,
            elastic_transform, pixelate or jpeg_compression.
        severity: 0 to 5.
    """

    name: ClassVar[str] = "corruption"

    def __post_init__(self) -> None:
        if self.corruption not in STANDARD_CORRUPTIONS:
            raise ConfigError(f"unknown corruption {self.corruption!r}; use one of {', '.join(STANDARD_CORRUPTIONS)}")
        if not 0 <= self.severity <= len(SEVERITIES):
            raise ConfigError(f"corruption severity must be 0 to 5, not {self.severity}")

    def corrupt(self, x: Tensor, keys: Tensor) -> Tensor:
        """The corrupted copy of ``x`` (see functions.py for each corruption)."""
        from robench.plugins.corruptions.functions import FUNCTIONS
        from robench.plugins.corruptions.params import params

        c = params(self.corruption, self.severity, x.shape[-1], x.shape[1])
        return FUNCTIONS[self.corruption](x.detach().cpu().float(), keys, c).to(x.device)


@dataclass(frozen=True, kw_only=True)
class Corruptions(ProtocolDef):
    """Common corruptions: 15 corruptions x severities 1-5, scored by RobustBench's corruption
    accuracy (the mean accuracy over the 75 sets; METHODS.md §5.1). No attack: each set is a
    keyed transform of the clean evaluation subset, generated once and cached.

    Args:
        corruptions: which corruptions (default: the 15 standard ones).
        severities: which severities (default: 1-5).
    """

    name: ClassVar[str] = "corruptions"
    # 2: zoom_blur's zooms as the reference's np.arange gives them, 8-bit steps as the reference's
    # (motion blur, snow), sets truncated to uint8 (1: rounded)
    revision: ClassVar[int] = 2
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = ()

    def build(self, preset: str) -> Protocol:
        """One use per (corruption, severity), each from the clean set; the same for every preset."""
        uses = tuple(
            AttackUse(PluginSpec.of("corruption", {"corruption": name, "severity": s}), robench.CLEAN_SOURCE)
            for name in self.corruptions or STANDARD_CORRUPTIONS
            for s in self.severities or SEVERITIES
        )
        return Protocol(name=self.name, uses=uses, revision=self.revision, norm="corruption")


@robench.hookimpl
def robench_attacks() -> list[type[robench.Attack]]:
    """The corruption plugin (an attack of the ``corruption`` threat)."""
    return [StandardCorruption]


@robench.hookimpl
def robench_protocols() -> list[type[ProtocolDef]]:
    """The corruptions protocol."""
    return [Corruptions]
