"""robench: adversarial-robustness benchmarks for compact image classifiers.

The public API for plugin authors is what ``__all__`` lists; everything else is internal.
"""

from __future__ import annotations

import importlib.metadata

import pluggy

from robench.architecture import Architecture
from robench.attack import Attack
from robench.context import Context, DataShape, ImageData, Threat
from robench.dataset import Dataset
from robench.defense import Defense, Variant
from robench.errors import CacheError, ConfigError, DataNotFoundError, RobenchError
from robench.protocol import AttackUse, Protocol, ProtocolDef, Surrogate

try:
    __version__ = importlib.metadata.version("robench")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

hookimpl = pluggy.HookimplMarker("robench")
"""Marker for hook implementations: ``@robench.hookimpl``."""

__all__ = [
    "Architecture",
    "Attack",
    "AttackUse",
    "CacheError",
    "ConfigError",
    "Context",
    "DataNotFoundError",
    "DataShape",
    "Dataset",
    "Defense",
    "ImageData",
    "Protocol",
    "ProtocolDef",
    "RobenchError",
    "Surrogate",
    "Threat",
    "Variant",
    "__version__",
    "hookimpl",
]
