"""What the benchmark scripts share: built (or cached) models outside a run, and the cache folder.

Not a script (tests/test_benchmarks.py runs every ``benchmarks/*.py`` but this one): the
scripts import it, so a change to how robench builds models is fixed here once instead of in
every script (two scripts once broke when ``Session`` stopped taking the plugin manager).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from robench.context import Progress
from robench.discover.manager import get_plugin_manager
from robench.discover.registry import Registries
from robench.execute.modelcache import ModelCache
from robench.execute.session import Session
from robench.execute.versions import TransferCache
from robench.plan.config import Benchmark
from robench.plugin import PluginSpec
from robench.results.storage import RunStore


def default_cache() -> Path:
    """``$ROBENCH_CACHE``, else ``~/.cache/robench``: the folder ``robench run`` uses."""
    return Path(os.environ.get("ROBENCH_CACHE", Path.home() / ".cache" / "robench"))


def model_session(
    cache: Path, benchmark: Benchmark | None = None, registries: Registries | None = None, scratch: Path | None = None
) -> Session:
    """A session that builds (or loads from ``cache``) the models of ``benchmark``; it writes no run.

    :param scratch: where its unused run folder would go (default: inside ``cache``)
    """
    registries = registries or Registries.collect(get_plugin_manager())
    benchmark = benchmark or Benchmark(name="bench", defenses=(PluginSpec("baseline"),), attacks=(PluginSpec("pgd"),))
    return Session(
        benchmark=benchmark,
        registries=registries,
        store=RunStore(scratch or cache / "unused-run"),
        cache=ModelCache(cache),
        transfer_cache=TransferCache(cache),
        device=torch.device("cpu"),
        progress=Progress(),
    )


def built_model(session: Session, spec: PluginSpec, seed: int = 0, dataset: str = "fashion-mnist") -> nn.Module:
    """The (cached) ``cnn8`` model of ``spec`` on ``dataset`` trained with ``seed``, in eval mode."""
    models = session.models(session.model_key(dataset, "cnn8", spec, seed))[0]
    return next(iter(models.values())).eval()
