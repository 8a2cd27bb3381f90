"""Execute a planned benchmark: build each model group once, evaluate its cells, store rows.

Together with ``registry.py`` this is the only module that calls plugin hooks. Failures
are isolated per cell: a plugin that raises yields an ``error`` row and the grid goes on.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy
import torch
from torch import nn

import robench
from robench.architecture import make_model
from robench.config import Benchmark, PluginSpec
from robench.context import Context, ImageData, Progress
from robench.efficiency import measure
from robench.errors import ConfigError
from robench.evaluate import evaluate
from robench.executor import Executor, LocalExecutor
from robench.grid import Cell, ModelKey, plan, resolve_attack, resolve_defense
from robench.metrics import accuracy, count, wilson_interval
from robench.modelcache import ModelCache, data_fingerprint
from robench.pluginmanager import plugin_infos
from robench.registry import Registries
from robench.storage import CellResult, RunStore
from robench.training import subset_indices


@dataclass
class Summary:
    """What a finished session reports back."""

    run_dir: Path
    results: list[CellResult]
    skipped: int

    @property
    def failed(self) -> list[CellResult]:
        """Cells stored with status ``error``."""
        return [r for r in self.results if r.status != "ok"]


@dataclass
class Group:
    """One model key and its cells: the unit an executor runs."""

    key: ModelKey
    cells: list[Cell]


@dataclass
class Session:
    """Everything needed to evaluate groups of one benchmark."""

    benchmark: Benchmark
    pm: pluggy.PluginManager
    registries: Registries
    store: RunStore
    cache: ModelCache
    device: torch.device
    progress: Progress
    provenance: dict[str, Any] = field(default_factory=dict)
    _data: dict[tuple[str, str], ImageData] = field(default_factory=dict)

    def data(self, dataset: str, split: str) -> ImageData:
        """A loaded split, loaded once per session."""
        if (dataset, split) not in self._data:
            self._data[dataset, split] = self.registries.datasets.get(dataset).create().load(split)  # type: ignore[arg-type]
        return self._data[dataset, split]

    def eval_indices(self, dataset: str) -> torch.Tensor:
        """The reproducible evaluation subset of the test split."""
        n = len(self.data(dataset, "test"))
        return subset_indices(n, self.benchmark.n_samples, self.benchmark.sample_seed)

    def context(self, key: ModelKey) -> Context:
        """The build context for ``key``'s defense."""
        dataset_cls = self.registries.datasets.get(key.dataset)
        arch = self.registries.architectures.get(key.arch).create()
        shape = dataset_cls.shape
        train = self.data(key.dataset, "train")
        folder = self.cache.folder(key, data_fingerprint(train))
        return Context(
            train=train,
            shape=shape,
            new_model=ModelFactory(arch, shape, key.seed),
            device=self.device,
            seed=key.seed,
            preset=key.preset,
            cache_dir=folder.with_name(folder.name + ".work"),
            default_eps=dataset_cls.default_eps["linf"],
            progress=self.progress,
            get_models=lambda name, params: self.models(
                ModelKey(key.dataset, key.arch, name, *_resolved(self, name, params, key), key.seed, key.preset)
            )[0],
        )

    def models(self, key: ModelKey) -> tuple[dict[str, nn.Module], float, str]:
        """Build (or load) the models of ``key``."""
        defense = resolve_defense(
            self.registries, PluginSpec.of(key.defense, json.loads(key.defense_params)), key.preset, key.dataset
        )
        ctx = self.context(key)
        return self.cache.get(key, defense, ctx, data_fingerprint(ctx.train))

    def work(self, group: Group) -> Iterator[CellResult]:
        """Build the group's model once, then evaluate each of its cells."""
        key = group.key
        self.progress.log(f"building {key.dataset}/{key.arch}/{key.defense_label}/seed={key.seed}")
        try:
            models, build_seconds, model_hash = self.models(key)
        except Exception as exc:  # a plugin bug must not lose the rest of the grid
            for cell in group.cells:
                yield self._error(cell, f"{key.defense}.build", exc)
            return
        defense = resolve_defense(
            self.registries, PluginSpec.of(key.defense, json.loads(key.defense_params)), key.preset, key.dataset
        )
        for cell in group.cells:
            self.pm.hook.robench_cell_start(cell=cell)
            try:
                yield self._evaluate(
                    cell, defense.variant(cell.variant, models[cell.variant]), build_seconds, model_hash
                )
            except Exception as exc:
                yield self._error(cell, f"{cell.attack}.perturb", exc)
            build_seconds = 0.0  # charged to the first cell of the group only

    def _evaluate(self, cell: Cell, variant: robench.Variant, build_seconds: float, model_hash: str) -> CellResult:
        started = _now()
        attack = resolve_attack(self.registries, PluginSpec.of(cell.attack, json.loads(cell.attack_params)), cell.norm)
        data = self.data(cell.model.dataset, "test")
        indices = self.eval_indices(cell.model.dataset)
        # Keys name the protocol and threat, not the defense: every defense sees the same starts.
        key = json.dumps([cell.model.dataset, cell.attack, cell.attack_params, cell.norm, cell.eps, cell.model.seed])
        out = evaluate(
            variant,
            attack,
            cell.threat,
            data,
            indices,
            key=key,
            batch_size=self.benchmark.batch_size,
            device=self.device,
            exhaustive=self.benchmark.exhaustive,
            progress=self.progress,
        )
        eff = measure(variant.model, data.batch(indices[:1])[0].to(self.device), bits=variant.bits)
        n_robust = count(out.robust)
        low, high = wilson_interval(n_robust, len(indices))
        row = {
            **self._key_columns(cell),
            "status": "ok",
            "error": "",
            "n": len(indices),
            "clean_acc": accuracy(out.clean),
            "robust_acc": accuracy(out.robust),
            "robust_ci_low": low,
            "robust_ci_high": high,
            "n_versions": attack.n_versions(),
            "exhaustive": self.benchmark.exhaustive,
            "randomized": variant.randomized,
            "params": eff.params,
            "nonzero_params": eff.nonzero_params,
            "bits": eff.bits,
            "model_bytes": eff.model_bytes,
            "macs": eff.macs,
            "latency_ms": eff.latency_ms,
            "build_seconds": build_seconds,
            "attack_seconds": out.seconds,
            "gradient_calls": out.forwards,
            "model_hash": model_hash,
            "started_at": started,
            "finished_at": _now(),
        }
        return CellResult(row, _sample_rows(cell.key, indices, out.clean, out.versions, out.attacked))

    def _key_columns(self, cell: Cell) -> dict[str, Any]:
        m = cell.model
        return {
            "cell_key": cell.key,
            "cell_id": cell.id,
            "dataset": m.dataset,
            "arch": m.arch,
            "defense": m.defense,
            "defense_params": m.defense_params,
            "preset": m.preset,
            "variant": cell.variant,
            "attack": cell.attack,
            "attack_params": cell.attack_params,
            "norm": cell.norm,
            "eps": cell.eps,
            "seed": m.seed,
            "sample_seed": cell.sample_seed,
            **self.provenance,
        }

    def _error(self, cell: Cell, where: str, exc: BaseException) -> CellResult:
        text = "".join(traceback.format_exception(exc))
        self.progress.log(f"ERROR {cell.id}: {where} raised {type(exc).__name__}: {exc}\n{text}")
        row = {
            **self._key_columns(cell),
            "status": "error",
            "error": f"{where}: {type(exc).__name__}: {exc}",
            "started_at": _now(),
            "finished_at": _now(),
        }
        return CellResult(row)


class ModelFactory:
    """Builds fresh models whose initialisation depends only on the seed and the call count,
    never on whatever else used the global generator before."""

    def __init__(self, arch: robench.Architecture, shape: robench.DataShape, seed: int) -> None:
        self.arch, self.shape, self.seed, self.calls = arch, shape, seed, 0

    def __call__(self) -> nn.Module:
        """The next fresh model."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.calls)
            self.calls += 1
            return make_model(self.arch, self.shape)


def run(
    benchmark: Benchmark,
    *,
    pm: pluggy.PluginManager,
    run_dir: Path,
    cache_dir: Path,
    device: str = "auto",
    executor: Executor | None = None,
    progress: Progress | None = None,
    select: str | None = None,
) -> Summary:
    """Plan, build, attack, score and store ``benchmark``; finished cells are skipped.

    :param select: only run cells whose id contains this substring
    """
    registries = Registries.collect(pm)
    cells = plan(benchmark, registries)
    if select:
        cells = [c for c in cells if select in c.id]
    pm.hook.robench_configure(benchmark=benchmark)
    pm.hook.robench_modify_plan(benchmark=benchmark, cells=cells)
    for name in benchmark.datasets:  # fail on missing data before any compute
        registries.datasets.get(name).create().locate()
    progress = progress or Progress()
    session = Session(
        benchmark, pm, registries, RunStore(run_dir), ModelCache(cache_dir), resolve_device(device), progress
    )
    session.provenance = _provenance(pm, benchmark, session.device)
    done = session.store.finished()
    pending = [c for c in cells if c.key not in done]
    _write_manifest(session, cells)
    progress.log(f"plan: {len(cells)} cells, {len(cells) - len(pending)} already finished in {run_dir}")
    results = [done[c.key] for c in cells if c.key in done]
    for result in (executor or LocalExecutor()).map(session.work, _groups(pending)):
        session.store.write(result)
        cell = next(c for c in pending if c.key == result.row["cell_key"])
        pm.hook.robench_cell_finish(cell=cell, result=result)
        results.append(result)
        progress.log(_line(result))
    _write_manifest(session, cells)
    pm.hook.robench_session_finish(benchmark=benchmark, results=results)
    return Summary(run_dir, results, len(cells) - len(pending))


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device; use cpu or auto")
    return torch.device(name)


def _groups(cells: Sequence[Cell]) -> list[Group]:
    groups: dict[ModelKey, Group] = {}
    for cell in cells:
        groups.setdefault(cell.model, Group(cell.model, [])).cells.append(cell)
    return list(groups.values())


def _resolved(session: Session, name: str, params: dict[str, object], key: ModelKey) -> tuple[str, str]:
    defense = resolve_defense(session.registries, PluginSpec.of(name, params), key.preset, key.dataset)
    return defense.canonical(), PluginSpec.of(name, params).label()


def _sample_rows(
    key: str, indices: torch.Tensor, clean: torch.Tensor, versions: list[torch.Tensor], attacked: list[torch.Tensor]
) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {"cell_key": [], "sample": [], "version": [], "correct": []}
    for version, (correct, ran) in enumerate([(clean, torch.ones_like(clean)), *zip(versions, attacked, strict=True)]):
        where = ran.nonzero().squeeze(1)
        cols["sample"] += indices[where].tolist()
        cols["correct"] += correct[where].tolist()
        cols["version"] += [version - 1] * len(where)
    cols["cell_key"] = [key] * len(cols["sample"])
    return cols


def _provenance(pm: pluggy.PluginManager, benchmark: Benchmark, device: torch.device) -> dict[str, Any]:
    plugins = {name: f"{i.dist}=={i.version}" for name, i in sorted(plugin_infos(pm).items())}
    return {
        "robench_version": robench.__version__,
        "plugins": json.dumps(plugins, sort_keys=True),
        "torch_version": torch.__version__,
        "device": str(device),
        "git_revision": _git_revision(),
        "config_hash": benchmark.config_hash(),
    }


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _write_manifest(session: Session, cells: list[Cell]) -> None:
    session.store.write_manifest(
        {
            "benchmark": session.benchmark.to_json(),
            "provenance": session.provenance,
            "cells": [{"key": c.key, "id": c.id} for c in cells],
            "eval_indices": {d: session.eval_indices(d).tolist() for d in session.benchmark.datasets},
            "models": {c.model.digest(): c.model.defense_label for c in cells},
        }
    )


def _line(result: CellResult) -> str:
    r = result.row
    if result.status != "ok":
        return f"FAILED {r['cell_id']}: {r['error']}"
    return (
        f"done {r['cell_id']}: clean {100 * r['clean_acc']:.1f}%  robust {100 * r['robust_acc']:.1f}% "
        f"[{100 * r['robust_ci_low']:.1f}, {100 * r['robust_ci_high']:.1f}]  n={r['n']}"
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
