"""robustbench 1.1.1 on today's stack: the one place that knows its import traps, and its zoo.

Nothing here imports robustbench at module level: it costs seconds (timm, pandas, gdown), so
it is imported when the defense builds or loads a model, never when robench starts or
registers its plugins (``robench --help`` stays fast).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any, cast

import robench

_IMPORT_LOCK = threading.Lock()


def import_robustbench() -> ModuleType:
    """``robustbench``, imported on first use, with the stand-ins robustbench 1.1.1 needs.

    Lazy on purpose: it imports timm, pandas and gdown (about 3 s on 2 cores on top of
    torch and torchvision), so robench imports it when this defense builds or loads a
    model, never at start-up or plugin registration. Two traps:

    * ``robustbench/loaders.py`` does ``import pkg_resources`` (and calls only
      ``pkg_resources.resource_filename``, for ImageNet file lists), which setuptools >= 81
      no longer ships. Without a real one, a stand-in module provides just that function.
    * ``robustbench/eval.py`` does ``from autoattack import AutoAttack`` and ``from
      autoattack.state import EvaluationState``; its dependency ``pyautoattack`` installs
      that code as the module ``pyautoattack``. Without a real ``autoattack``, both names
      point at pyautoattack's modules.

    The stand-ins are in ``sys.modules`` only while robustbench imports: its modules keep
    the references they bound, and the rest of the process never sees a partial
    ``pkg_resources`` (libraries probe that import to choose code paths) or an
    ``autoattack`` that is not installed. The lock keeps other threads from seeing them.
    """
    with _IMPORT_LOCK:
        if "robustbench.model_zoo" in sys.modules:
            return sys.modules["robustbench"]
        shims = _shims()
        sys.modules.update(shims)
        try:
            with warnings.catch_warnings():  # noise from robustbench's own imports, not the user's code:
                warnings.filterwarnings("ignore", "`torch.jit.interface` is deprecated", FutureWarning)  # timm's hrnet
                warnings.filterwarnings("ignore", "Importing from timm.models", DeprecationWarning)  # old timm paths
                module = importlib.import_module("robustbench")
                importlib.import_module("robustbench.model_zoo")
        except ImportError as exc:
            raise robench.RobenchError(
                "the robustbench defense needs the robustbench package and what it imports (timm, gdown, "
                f"geotorch, pyautoattack): pip install robustbench==1.1.1. Importing it failed: {exc!r}"
            ) from exc
        finally:
            for name, shim in shims.items():
                if sys.modules.get(name) is shim:
                    del sys.modules[name]
        return module


def _shims() -> dict[str, ModuleType]:
    shims: dict[str, ModuleType] = {}
    if importlib.util.find_spec("pkg_resources") is None:
        stand_in = ModuleType("pkg_resources", "robench's stand-in for robustbench: resource_filename only")
        stand_in.resource_filename = _resource_filename  # type: ignore[attr-defined]
        shims["pkg_resources"] = stand_in
    if importlib.util.find_spec("autoattack") is None and importlib.util.find_spec("pyautoattack") is not None:
        shims["autoattack"] = importlib.import_module("pyautoattack")
        shims["autoattack.state"] = importlib.import_module("pyautoattack.state")
    return shims


def _resource_filename(package: str, resource: str) -> str:
    """pkg_resources' answer for an installed file tree: beside the module's file."""
    return os.path.join(os.path.dirname(importlib.import_module(package).__file__ or ""), resource)


def zoo_entry(dataset: str, threat_model: str, name: str) -> Mapping[str, Any]:
    """robustbench's zoo entry (``model`` constructor, ``gdrive_id``) for a model.

    :raises robench.ConfigError: unknown name (with near matches), or a zoo robustbench lacks
    """
    import_robustbench()
    enums = importlib.import_module("robustbench.model_zoo.enums")
    zoos = importlib.import_module("robustbench.model_zoo").model_dicts[enums.BenchmarkDataset(dataset)]
    zoo = zoos.get(enums.ThreatModel(threat_model))
    if zoo is None:
        raise robench.ConfigError(f"RobustBench has no {dataset} {threat_model} models")
    if name in zoo:
        return cast(Mapping[str, Any], zoo[name])
    close = difflib.get_close_matches(name, list(zoo), n=3, cutoff=0.6)
    elsewhere = [tm.value for tm, models in zoos.items() if name in models]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    hint += f" It is a {'/'.join(elsewhere)} model: -D threat_model={elsewhere[0]}." if elsewhere else ""
    raise robench.ConfigError(f"RobustBench has no {dataset} {threat_model} model {name!r}.{hint}")
