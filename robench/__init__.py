"""robench: adversarial-robustness benchmarks for compact image classifiers.

The public API is what ``__all__`` lists: the plugin contracts (``Attack``, ``Defense``,
``Dataset``, ``Architecture``, ``ProtocolDef`` and the values they receive), the helpers
plugins build on (training loop, per-sample random draws, losses, ensembles, ``BPDA``), the hook
arguments (``Benchmark``, ``Cell``, ``CellResult``) and the errors. Everything else is
internal and may change; built-in plugins import nothing else (tests/test_public_api.py).

Names are imported on first use (PEP 562), so ``import robench`` does not import torch:
``robench --help`` and argument errors answer before torch has loaded.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

import pluggy

try:
    __version__ = importlib.metadata.version("robench")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

hookimpl = pluggy.HookimplMarker("robench")
"""Marker for hook implementations: ``@robench.hookimpl``."""

_EXPORTS: dict[str, str] = {
    "Architecture": "robench.architecture",
    "Attack": "robench.attack",
    "AttackUse": "robench.protocol",
    "BPDA": "robench.bpda",
    "Benchmark": "robench.plan.config",
    "CacheError": "robench.errors",
    "Cell": "robench.cell",
    "CellResult": "robench.results.storage",
    "CLEAN_SOURCE": "robench.protocol",
    "DEFAULT_EOT": "robench.protocol",
    "DEFAULT_VOTES": "robench.protocol",
    "ConfigError": "robench.errors",
    "Context": "robench.context",
    "Corruption": "robench.corruption",
    "DataNotFoundError": "robench.errors",
    "DataShape": "robench.context",
    "Dataset": "robench.dataset",
    "Defense": "robench.defense",
    "Ensemble": "robench.execute.versions",
    "ImageData": "robench.context",
    "AfterStep": "robench.training",
    "InputFn": "robench.training",
    "LossFn": "robench.losses",
    "LossName": "robench.losses",
    "LossStep": "robench.training",
    "ModelKey": "robench.cell",
    "Normalize": "robench.architecture",
    "Norm": "robench.context",
    "PluginSpec": "robench.plugin",
    "Reference": "robench.defense",
    "Progress": "robench.context",
    "ProgressBar": "robench.context",
    "Protocol": "robench.protocol",
    "ProtocolDef": "robench.protocol",
    "RobenchError": "robench.errors",
    "Schedule": "robench.training",
    "Split": "robench.dataset",
    "Stateful": "robench.resume",
    "Surrogate": "robench.protocol",
    "Threat": "robench.context",
    "UnknownPluginError": "robench.errors",
    "evaluate": "robench.api",
    "read_run": "robench.api",
    "Variant": "robench.defense",
    "SEVERITIES": "robench.corruption",
    "STANDARD_CORRUPTIONS": "robench.corruption",
    "crop_flip": "robench.training",
    "cross_entropy": "robench.losses",
    "cw_margin": "robench.losses",
    "derive_key": "robench.attack",
    "get_loss": "robench.losses",
    "iterate": "robench.training",
    "pgd_inputs": "robench.training",
    "sample_keys": "robench.attack",
    "sample_normal": "robench.attack",
    "sample_uniform": "robench.attack",
    "sgd": "robench.training",
    "subset_indices": "robench.training",
    "train": "robench.training",
}
"""Public name -> the module that defines it (and documents it)."""

__all__ = [
    "BPDA",
    "CLEAN_SOURCE",
    "DEFAULT_EOT",
    "DEFAULT_VOTES",
    "SEVERITIES",
    "STANDARD_CORRUPTIONS",
    "AfterStep",
    "Architecture",
    "Attack",
    "AttackUse",
    "Benchmark",
    "CacheError",
    "Cell",
    "CellResult",
    "ConfigError",
    "Context",
    "Corruption",
    "DataNotFoundError",
    "DataShape",
    "Dataset",
    "Defense",
    "Ensemble",
    "ImageData",
    "InputFn",
    "LossFn",
    "LossName",
    "LossStep",
    "ModelKey",
    "Norm",
    "Normalize",
    "PluginSpec",
    "Progress",
    "ProgressBar",
    "Protocol",
    "ProtocolDef",
    "Reference",
    "RobenchError",
    "Schedule",
    "Split",
    "Stateful",
    "Surrogate",
    "Threat",
    "UnknownPluginError",
    "Variant",
    "__version__",
    "crop_flip",
    "cross_entropy",
    "cw_margin",
    "derive_key",
    "evaluate",
    "get_loss",
    "hookimpl",
    "iterate",
    "pgd_inputs",
    "read_run",
    "sample_keys",
    "sample_normal",
    "sample_uniform",
    "sgd",
    "subset_indices",
    "train",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'robench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from robench.api import evaluate as evaluate
    from robench.api import read_run as read_run
    from robench.architecture import Architecture as Architecture
    from robench.architecture import Normalize as Normalize
    from robench.attack import Attack as Attack
    from robench.attack import derive_key as derive_key
    from robench.attack import sample_keys as sample_keys
    from robench.attack import sample_normal as sample_normal
    from robench.attack import sample_uniform as sample_uniform
    from robench.bpda import BPDA as BPDA
    from robench.cell import Cell as Cell
    from robench.cell import ModelKey as ModelKey
    from robench.context import Context as Context
    from robench.context import DataShape as DataShape
    from robench.context import ImageData as ImageData
    from robench.context import Norm as Norm
    from robench.context import Progress as Progress
    from robench.context import ProgressBar as ProgressBar
    from robench.context import Threat as Threat
    from robench.corruption import SEVERITIES as SEVERITIES
    from robench.corruption import STANDARD_CORRUPTIONS as STANDARD_CORRUPTIONS
    from robench.corruption import Corruption as Corruption
    from robench.dataset import Dataset as Dataset
    from robench.dataset import Split as Split
    from robench.defense import Defense as Defense
    from robench.defense import Reference as Reference
    from robench.defense import Variant as Variant
    from robench.errors import CacheError as CacheError
    from robench.errors import ConfigError as ConfigError
    from robench.errors import DataNotFoundError as DataNotFoundError
    from robench.errors import RobenchError as RobenchError
    from robench.errors import UnknownPluginError as UnknownPluginError
    from robench.execute.versions import Ensemble as Ensemble
    from robench.losses import LossFn as LossFn
    from robench.losses import LossName as LossName
    from robench.losses import cross_entropy as cross_entropy
    from robench.losses import cw_margin as cw_margin
    from robench.losses import get_loss as get_loss
    from robench.plan.config import Benchmark as Benchmark
    from robench.plugin import PluginSpec as PluginSpec
    from robench.protocol import CLEAN_SOURCE as CLEAN_SOURCE
    from robench.protocol import DEFAULT_EOT as DEFAULT_EOT
    from robench.protocol import DEFAULT_VOTES as DEFAULT_VOTES
    from robench.protocol import AttackUse as AttackUse
    from robench.protocol import Protocol as Protocol
    from robench.protocol import ProtocolDef as ProtocolDef
    from robench.protocol import Surrogate as Surrogate
    from robench.results.storage import CellResult as CellResult
    from robench.resume import Stateful as Stateful
    from robench.training import AfterStep as AfterStep
    from robench.training import InputFn as InputFn
    from robench.training import LossStep as LossStep
    from robench.training import Schedule as Schedule
    from robench.training import crop_flip as crop_flip
    from robench.training import iterate as iterate
    from robench.training import pgd_inputs as pgd_inputs
    from robench.training import sgd as sgd
    from robench.training import subset_indices as subset_indices
    from robench.training import train as train
