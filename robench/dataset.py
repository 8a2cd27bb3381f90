"""The contract for dataset plugins."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

from robench.context import DataShape, ImageData, Norm
from robench.plugin import Plugin

Split = Literal["train", "test"]


@dataclass(frozen=True, kw_only=True)
class Dataset(Plugin, ABC):
    """Base class for datasets of (image, label) with train and test splits.

    Images come back as uint8 NCHW tensors; robench converts them to floats in [0, 1].
    :meth:`locate` must be cheap and raise :class:`robench.errors.DataNotFoundError`, saying
    where it looked and how to get the data, so a run fails before any compute.
    """

    kind: ClassVar[str] = "dataset"
    shape: ClassVar[DataShape]
    default_eps: ClassVar[dict[Norm, float]] = {"linf": 8 / 255, "l2": 0.5}

    @abstractmethod
    def locate(self) -> str:
        """Find the data (or check it can be downloaded); return a description of where."""

    @abstractmethod
    def load(self, split: Split) -> ImageData:
        """Load one split into memory."""
