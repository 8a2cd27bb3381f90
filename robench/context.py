"""Value objects passed between robench and its plugins: threats, data shapes, build contexts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from robench.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: planning and --help must not wait for it
    import torch
    from torch import nn

Norm = Literal["linf", "l2", "corruption"]
NORMS: tuple[Norm, ...] = ("linf", "l2")
"""The norms of perturbation threats, the ones ``--norm`` takes. ``corruption`` (common
corruptions, DESIGN.md §2) has no radius: a protocol that fixes it (``Protocol.norm``) gets
cells with ``eps = 0``."""


@dataclass(frozen=True)
class Threat:
    """A threat model: the norm and radius of allowed perturbations.

    ``eps`` is in pixel units of [0, 1] images, never in normalised units: normalisation
    lives inside the model (DESIGN.md §2).
    """

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        if self.norm == "corruption" and self.eps == 0:
            return
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}; use one of {', '.join(NORMS)}")
        if not 0 <= self.eps <= (1.0 if self.norm == "linf" else 1e3):
            raise ConfigError(
                f"eps={self.eps} is outside the valid range for {self.norm}; eps is in "
                "[0, 1] pixel units (e.g. 8/255 = 0.0314 for CIFAR Linf)"
            )


@dataclass(frozen=True)
class DataShape:
    """What an architecture must adapt to: input shape, class count and normalisation."""

    channels: int
    height: int
    width: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ImageData:
    """A dataset split held in memory: uint8 NCHW images and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] and labels for the given indices."""
        return self.images[index].float().div_(255), self.labels[index]


class Progress:
    """Progress reporting handed to plugins; the runner supplies a tqdm-backed one."""

    def bar(self, total: int, desc: str) -> ProgressBar:
        """Return a bar for ``total`` steps described by ``desc``."""
        return ProgressBar()

    def log(self, message: str) -> None:
        """Print one status line (quiet, CI-friendly)."""


class ProgressBar:
    """A progress bar that does nothing; real bars subclass it."""

    def update(self, n: int = 1, **postfix: float) -> None:
        """Advance by ``n`` steps, optionally showing named figures."""

    def close(self) -> None:
        """Finish the bar."""


@dataclass(frozen=True)
class Context:
    """Everything a defense needs to build its models.

    :param train: the training split (uint8 images, labels)
    :param shape: input shape and class count, for architectures
    :param new_model: builds a fresh, randomly initialised model of the chosen architecture,
        normalisation included; it takes [0, 1] inputs and returns logits
    :param device: where to train
    :param seed: the cell's seed; every random draw in training derives from it
    :param preset: ``smoke`` or ``paper``
    :param cache_dir: a folder private to this build, for intermediate artefacts
    :param default_eps: the dataset's default Linf eps, for defenses that train against one
    :param progress: progress reporting
    :param get_models: builds (or loads from cache) another defense's variants, e.g. the
        start model of a fine-tuning defense: ``get_models("advt", {"eps": 0.1})``
    :param dataset: the dataset's registry name (``fashion-mnist``, ``cifar10``, ...), for
        defenses that load models made for one dataset
    :param cache_root: the cache folder shared by every build (``--cache-dir``), for what a
        plugin keeps across models and runs (e.g. trust-on-first-use hashes of weights files);
        ``None`` outside a run
    """

    train: ImageData
    shape: DataShape
    new_model: Callable[[], nn.Module]
    device: torch.device
    seed: int
    preset: str
    cache_dir: Path
    default_eps: float = 0.0
    progress: Progress = field(default_factory=Progress)
    get_models: Callable[[str, dict[str, object]], dict[str, nn.Module]] | None = None
    dataset: str = ""
    cache_root: Path | None = None

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from the cell's seed (and ``salt``, for independent streams)."""
        import torch

        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + salt)
        return g
