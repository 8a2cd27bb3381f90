"""robench as a library: evaluate a model you hold, read a run folder back.

:func:`evaluate` runs the same engine as ``robench run`` (planning, model checks,
per-sample keys, early exit, all-or-nothing scoring, flags, atomic storage) on an
``nn.Module`` the caller passes in, wrapped as a one-model defense; :func:`read_run` reads
any run folder as a table. AutoAttack's ``run_standard_evaluation`` and RobustBench's
``benchmark`` are the models for the call shape.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import robench
from robench.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn


def evaluate(
    model: nn.Module,
    *,
    dataset: str = "fashion-mnist",
    attack: str | None = None,
    protocol: str | None = None,
    eps: float | Sequence[float] | None = None,
    norm: str = "linf",
    n_samples: int = 1000,
    sample_seed: int = 0,
    sample_order: str = "random",
    seed: int = 0,
    attack_params: Mapping[str, Any] | None = None,
    protocol_params: Mapping[str, Any] | None = None,
    randomized: bool = False,
    name: str = "model",
    preset: str = "smoke",
    device: str = "auto",
    batch_size: int = 250,
    shard_size: int | None = None,
    exhaustive: bool = False,
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    plugins: Sequence[object] = (),
) -> pd.DataFrame:
    """Evaluate ``model`` as ``robench run`` evaluates a defense; one row per eps.

    :param model: takes [0, 1] images (NCHW, normalisation inside the model) and returns
        logits; it is put in eval mode and on ``device``
    :param dataset: a registered dataset (``robench list datasets``); its test split is used
    :param attack: a registered attack (its restarts are the versions of a one-attack
        all-or-nothing protocol); give this or ``protocol`` (default: ``pgd``)
    :param protocol: a registered protocol, e.g. ``whitebox-pgd``, ``autoattack``
    :param eps: one radius or several, in [0, 1] pixel units (default: the dataset's)
    :param sample_order: ``random`` (the subset drawn with ``sample_seed``) or ``first`` (the
        first ``n_samples`` test images in order, as RobustBench's leaderboard evaluates;
        ``robench run --sample-order``)
    :param protocol_params: the protocol's parameters; with ``attack``, the ``eot`` and ``votes``
        of its one-attack protocol (the only parameters it takes)
    :param randomized: declare the model's prediction random (EOT and votes); the model
        checks find undeclared randomness anyway and flag it
    :param name: the ``defense`` column of the rows
    :param shard_size: samples per shard (``robench run --shard-size``; default: robench's)
    :param out: a run folder to write (``robench show``, ``check`` and ``report`` read it;
        a second call with the same model and settings resumes it); default: a temporary one
    :param cache_dir: model and transfer-set cache (default ``$ROBENCH_CACHE`` or
        ``~/.cache/robench``); the model's weights are stored there under their hash, and
        surrogates and transfer sets are shared with ``robench run``
    :param plugins: plugin objects to register for this call besides the installed ones
        (e.g. a dataset of your own: an object with ``@robench.hookimpl`` methods)
    :returns: the cells table of the evaluated cells (columns: ``robench show --schema``)
    :raises robench.RobenchError: on bad input, before any compute
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        raise ConfigError(f"robench.evaluate needs a torch.nn.Module, got {type(model).__name__}")
    if attack and protocol:
        raise ConfigError("give attack= or protocol=, not both")
    settings = dict(protocol_params or {})
    benchmark = robench.Benchmark(
        name=name,
        datasets=(dataset,),
        defenses=(robench.PluginSpec.of(name, {"weights": weights_hash(model)}),),
        attacks=() if protocol else (robench.PluginSpec.of(attack or "pgd", attack_params),),
        protocols=(robench.PluginSpec.of(protocol, protocol_params),) if protocol else (),
        # protocol_params without a protocol: eot and votes of the attack's one-attack protocol
        attack_settings=() if protocol or not protocol_params else (robench.PluginSpec.of(attack or "pgd", settings),),
        norm=norm,  # type: ignore[arg-type]  # checked by Benchmark
        eps=tuple(eps) if isinstance(eps, Sequence) else (() if eps is None else (float(eps),)),
        seeds=(seed,),
        preset=preset,
        n_samples=n_samples,
        sample_seed=sample_seed,
        sample_order=sample_order,
        batch_size=batch_size,
        exhaustive=exhaustive,
    )
    if shard_size is not None:
        benchmark = dataclasses.replace(benchmark, shard_size=shard_size)
    with tempfile.TemporaryDirectory(prefix="robench-evaluate-") as tmp:
        run_dir = Path(out) if out is not None else Path(tmp) / "run"
        defense = given_defense(model, name, randomized)
        return _run(benchmark, [_GivenPlugin(defense), *plugins], run_dir, cache_dir, device, progress)


def read_run(path: str | Path, samples: bool = False) -> pd.DataFrame:
    """A run folder's cells table, or with ``samples=True`` its per-sample outcomes.

    Damaged files are skipped with a warning naming them (see ``robench show``).

    :raises robench.RobenchError: if ``path`` is not a robench run folder
    """
    from robench.results.runfolder import RunFolderError
    from robench.results.storage import RunStore

    folder = Path(path)
    if not (folder / "cells").is_dir():
        raise RunFolderError(f"{folder} is not a robench run folder (it has no cells/ directory)")
    store = RunStore(folder)
    return store.read_samples() if samples else store.read_cells()


def weights_hash(model: nn.Module) -> str:
    """sha256 of the model's class and state (names, dtypes, shapes, values): the model's key."""
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    import torch

    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):  # e.g. packed int8 parameters: described by their repr
            digest.update(f"{key}:{value!r}".encode())
            continue
        tensor = value.detach().cpu()
        if tensor.is_quantized:
            digest.update(f"{key}:{tensor.q_scale()}:{tensor.q_zero_point()}".encode())
            tensor = tensor.int_repr()
        tensor = tensor.contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def given_defense(model: nn.Module, name: str, randomized: bool) -> type[robench.Defense]:
    """A one-model defense class named ``name`` whose only variant is ``model``.

    Its ``weights`` parameter (the model's :func:`weights_hash`) is what makes the model
    key, and so the cached copy and the cells, belong to these weights and no others.
    """

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Given(robench.Defense):
        """A model passed to robench.evaluate.

        Args:
            weights: sha256 of the model's class and state.
        """

        weights: str = ""

        def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
            """The model itself: nothing to train."""
            return {"model": model}

        def skeletons(self, ctx: robench.Context) -> dict[str, nn.Module]:
            """A copy of the model, to load the cached weights into."""
            return {"model": copy.deepcopy(model)}

        def variant(self, variant: str, fitted: nn.Module) -> robench.Variant:
            """The model, randomized if declared so."""
            return robench.Variant(name=variant, model=fitted, randomized=randomized)

    Given.name = name  # the registry name, set per call
    return Given


class _GivenPlugin:
    """Registers the one-model defense for a single :func:`evaluate` call."""

    def __init__(self, defense: type[robench.Defense]) -> None:
        self.defense = defense

    @robench.hookimpl
    def robench_defenses(self) -> list[type[robench.Defense]]:
        """The given model's defense."""
        return [self.defense]


def _run(
    benchmark: robench.Benchmark,
    plugins: Sequence[object],
    run_dir: Path,
    cache_dir: str | Path | None,
    device: str,
    progress: bool,
) -> pd.DataFrame:
    from robench.discover.manager import get_plugin_manager
    from robench.execute.progress import TqdmProgress
    from robench.execute.runner import run
    from robench.results.storage import RunStore

    pm = get_plugin_manager()
    for i, plugin in enumerate(plugins):
        pm.register(plugin, name=f"robench.evaluate:{i}")
    cache = Path(cache_dir) if cache_dir is not None else _default_cache()
    reporter = TqdmProgress() if progress else robench.Progress()
    summary = run(benchmark, pm=pm, run_dir=run_dir, cache_dir=cache, device=device, progress=reporter)
    keys = {r.row["cell_key"] for r in summary.results}
    cells = RunStore(run_dir).read_cells()
    out: pd.DataFrame = cells[cells["cell_key"].isin(keys)].sort_values("eps").reset_index(drop=True)
    return out


def _default_cache() -> Path:
    return Path(os.environ.get("ROBENCH_CACHE", Path.home() / ".cache" / "robench"))


__all__ = ["evaluate", "given_defense", "read_run", "weights_hash"]
