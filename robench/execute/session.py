"""One benchmark's working state: loaded data, model building (cached), and cell evaluation.

The runner drives a :class:`Session`; executors call :meth:`Session.work` on model groups.
Failures are isolated per cell: a plugin that raises yields an ``error`` row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch
from torch import nn

import robench
from robench.architecture import make_model
from robench.attack import derive_key
from robench.cell import Cell, ModelKey
from robench.context import Context, ImageData, Progress
from robench.discover.registry import Registries
from robench.execute.efficiency import measure
from robench.execute.engine import Outcome, Setup, deterministic, evaluate, generate
from robench.execute.modelcache import ModelCache, data_fingerprint
from robench.execute.modelcheck import (
    CHECK_SAMPLES,
    ModelChecks,
    ModelContractError,
    as_evaluated,
    check_columns,
    check_model,
    with_masking_versions,
)
from robench.execute.versions import Ensemble, TransferCache, Version, expand
from robench.plan.config import Benchmark
from robench.plan.grid import model_key, resolve_defense
from robench.plugin import PluginSpec
from robench.protocol import Protocol, Surrogate
from robench.results.metrics import accuracy, count, wilson_interval
from robench.results.storage import CellResult, RunStore
from robench.training import subset_indices


@dataclass
class Group:
    """One model key and its cells: the unit an executor runs."""

    key: ModelKey
    cells: list[Cell]


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


@dataclass
class Session:
    """Everything needed to evaluate groups of one benchmark."""

    benchmark: Benchmark
    pm: pluggy.PluginManager
    registries: Registries
    store: RunStore
    cache: ModelCache
    transfer_cache: TransferCache
    device: torch.device
    progress: Progress
    provenance: dict[str, Any] = field(default_factory=dict)
    _data: dict[tuple[str, str], ImageData] = field(default_factory=dict)

    def data(self, dataset: str, split: str) -> ImageData:
        """A loaded split, loaded once per session."""
        if (dataset, split) not in self._data:
            loaded = self.registries.datasets.get(dataset).create().load(split)  # type: ignore[arg-type]
            self._data[dataset, split] = loaded
        return self._data[dataset, split]

    def eval_indices(self, dataset: str) -> torch.Tensor:
        """The reproducible evaluation subset of the test split."""
        n = len(self.data(dataset, "test"))
        return subset_indices(n, self.benchmark.n_samples, self.benchmark.sample_seed)

    def model_key(self, dataset: str, arch: str, spec: PluginSpec, seed: int) -> ModelKey:
        """The key of ``spec`` (preset applied) on ``dataset``/``arch`` with ``seed``."""
        preset = self.benchmark.preset
        return model_key(resolve_defense(self.registries, spec, preset, dataset), dataset, arch, spec, seed, preset)

    def context(self, key: ModelKey) -> Context:
        """The build context for ``key``'s defense."""
        dataset_cls = self.registries.datasets.get(key.dataset)
        arch = self.registries.architectures.get(key.arch).create()
        train = self.data(key.dataset, "train")
        folder = self.cache.folder(key, data_fingerprint(train))
        return Context(
            train=train,
            shape=dataset_cls.shape,
            new_model=ModelFactory(arch, dataset_cls.shape, key.seed),
            device=self.device,
            seed=key.seed,
            preset=key.preset,
            cache_dir=folder.with_name(folder.name + ".work"),
            default_eps=dataset_cls.default_eps["linf"],
            progress=self.progress,
            dataset=key.dataset,
            get_models=lambda name, params: self.models(
                self.model_key(key.dataset, key.arch, PluginSpec.of(name, params), key.seed)
            )[0],
        )

    def models(self, key: ModelKey) -> tuple[dict[str, nn.Module], float, str]:
        """Build (or load) the models of ``key``: (variant -> model, build seconds, cache name)."""
        defense = self.defense(key)
        fingerprint = data_fingerprint(self.data(key.dataset, "train"))
        return self.cache.get(key, defense, lambda: self.context(key), fingerprint)

    def defense(self, key: ModelKey) -> robench.Defense:
        """The resolved defense instance of ``key``."""
        spec = PluginSpec.of(key.defense, json.loads(key.defense_params))
        return resolve_defense(self.registries, spec, key.preset, key.dataset)

    def surrogate(self, cell: Cell, surrogate: Surrogate) -> tuple[nn.Module, list[str]]:
        """The surrogate ensemble for ``cell`` and the cache names of its members."""
        members, hashes = [], []
        for seed in surrogate.seeds:
            key = self.model_key(cell.model.dataset, surrogate.arch or cell.model.arch, surrogate.defense, seed)
            models, _, name = self.models(key)
            members.append(next(iter(models.values())).eval())
            hashes.append(name)
        return Ensemble(members).to(self.device).eval(), hashes

    def work(self, group: Group) -> Iterator[CellResult]:
        """Build the group's model once, then evaluate each of its cells."""
        key = group.key
        self.progress.log(f"building {key.dataset}/{key.arch}/{key.defense_label}/seed={key.seed}")
        try:
            models, build_seconds, model_hash = self.models(key)
            defense = self.defense(key)
        except Exception as exc:  # a plugin bug must not lose the rest of the grid
            for cell in group.cells:
                yield self._error(cell, f"{key.defense}.build", exc)
            return
        for cell in group.cells:
            self.pm.hook.robench_cell_start(cell=cell)
            try:
                make_variant = functools.partial(defense.variant, cell.variant, models[cell.variant])
                yield self._evaluate(cell, make_variant, build_seconds, model_hash)
            except ModelContractError as exc:
                yield self._error(cell, "model checks", exc)
            except Exception as exc:
                yield self._error(cell, f"protocol {cell.protocol.name}", exc)
            build_seconds = 0.0  # charged to the first cell of the group only

    def _evaluate(
        self, cell: Cell, make_variant: Callable[[], robench.Variant], build_seconds: float, model_hash: str
    ) -> CellResult:
        started = _now()
        data = self.data(cell.model.dataset, "test")
        indices = self.eval_indices(cell.model.dataset)
        p = cell.protocol
        setup = Setup(
            key=json.dumps([cell.model.dataset, p.name, cell.norm, cell.eps, cell.model.seed]),
            batch_size=self.benchmark.batch_size,
            device=self.device,
            exhaustive=self.benchmark.exhaustive,
            votes=p.votes,
            eot=p.eot,
        )
        with _seeded_global_rng(cell.key, self.device):  # undeclared random models: reproducible per cell
            declared, checks = self._check(cell, make_variant, data, indices, setup)
            variant = as_evaluated(declared, checks)
            protocol = self._masking_protocol(cell) if checks.vanishing else p
            versions = expand(protocol, self.registries, cell.norm)
            transfer = _TransferSource(self, cell, protocol, setup, data, indices)
            out = evaluate(
                variant, versions, cell.threat, data, indices, setup=setup, transfer=transfer, progress=self.progress
            )
        eff = measure(
            declared.model,
            data.batch(indices[:1])[0].to(self.device),
            bits=declared.bits,
            counted=declared.attack_model,
        )
        own = len(expand(p, self.registries, cell.norm))
        row = {
            **self._key_columns(cell),
            **_scores(out, len(indices)),
            **check_columns(checks, declared.randomized, out, versions[own:] if checks.vanishing else []),
            "status": "ok",
            "error": "",
            "n_versions": len(versions),
            "exhaustive": self.benchmark.exhaustive,
            "randomized": variant.randomized,
            "quantized_engine": variant.quantized_engine,
            "weights_sha256": declared.weights_sha256,
            "eot": p.eot if variant.randomized else 0,
            "votes": p.votes if variant.randomized else 1,
            "params": eff.params,
            "nonzero_params": eff.nonzero_params,
            "bits": eff.bits,
            "model_bytes": eff.model_bytes,
            "macs": eff.macs,
            "latency_ms": eff.latency_ms,
            "build_seconds": build_seconds,
            "attack_seconds": out.seconds,
            "transfer_seconds": transfer.seconds,
            "gradient_calls": out.gradient_calls,
            "queries": out.queries,
            "versions": json.dumps([v.label for v in versions]),
            "transfer_sets": json.dumps(transfer.used, sort_keys=True),
            "model_hash": model_hash,
            "started_at": started,
            "finished_at": _now(),
        }
        return CellResult(row, _sample_rows(cell.key, indices, out))

    def _check(
        self,
        cell: Cell,
        make_variant: Callable[[], robench.Variant],
        data: ImageData,
        indices: torch.Tensor,
        setup: Setup,
    ) -> tuple[robench.Variant, ModelChecks]:
        """The declared variant and the model checks on the first of the cell's samples."""
        variant = make_variant()
        x, y = data.batch(indices[:CHECK_SAMPLES])
        placed = dataclasses.replace(
            variant,
            model=setup.place_model(variant.model),
            grad_model=None if variant.grad_model is None else setup.place_model(variant.grad_model),
        )
        num_classes = self.registries.datasets.get(cell.model.dataset).shape.num_classes
        with deterministic(setup.device):  # as the attacks run: on CUDA, repeats must not differ by kernel choice
            checks = check_model(placed, setup.place(x), y.to(setup.device), num_classes)
        if checks.fired(variant.randomized) or checks.training_modules:
            self.progress.log(f"checks {cell.id}: {checks.describe(variant.randomized)}")
        if variant.randomized:  # restart its random stream: the checks drew from it
            variant = make_variant()
        return variant, checks

    def _masking_protocol(self, cell: Cell) -> Protocol:
        """The cell's protocol with the masking diagnosis's transfer and Square versions."""
        baseline = next((s for s in self.benchmark.defenses if s.name == "baseline"), PluginSpec("baseline"))
        return with_masking_versions(cell.protocol, self.registries, baseline, self.benchmark.preset)

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
            "protocol": cell.protocol.name,
            "protocol_spec": cell.protocol.canonical(),
            "protocol_revision": cell.protocol.revision,
            "transfer": cell.protocol.is_transfer(),
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


class _TransferSource:
    """Gives a cell the transfer examples of a version: from the shared cache, or generated
    once against the surrogate and stored for every other target."""

    def __init__(
        self, session: Session, cell: Cell, protocol: Protocol, setup: Setup, data: ImageData, indices: torch.Tensor
    ) -> None:
        self.session, self.cell, self.protocol = session, cell, protocol
        self.setup, self.data, self.indices = setup, data, indices
        self.seconds = 0.0
        self.used: list[str] = []
        self._surrogates: dict[str, tuple[nn.Module, list[str]]] = {}

    def __call__(self, version: Version) -> torch.Tensor:
        start = _now()
        assert version.use.source is not None
        surrogate = self.protocol.surrogate(version.use.source)
        if surrogate.name not in self._surrogates:
            self._surrogates[surrogate.name] = self.session.surrogate(self.cell, surrogate)
        model, hashes = self._surrogates[surrogate.name]
        key = {
            "dataset": self.cell.model.dataset,
            "indices": data_hash(self.indices),
            "surrogate": hashes,
            "version": version.key(),
            "norm": self.cell.norm,
            "eps": self.cell.eps,
            "seed": self.cell.model.seed,
        }
        clean = self.data.batch(self.indices)[0]
        x_adv = self.session.transfer_cache.get(key, clean, self.cell.threat)
        if x_adv is None:
            self.session.progress.log(f"generating transfer set {version.label} at eps={self.cell.eps:g}")
            setup = Setup(
                key=json.dumps(key, sort_keys=True),
                batch_size=self.setup.batch_size,
                device=self.setup.device,
                exhaustive=True,
            )
            x_adv = generate(model, version, self.cell.threat, self.data, self.indices, setup)
            self.session.transfer_cache.put(key, x_adv)
        self.used.append(self.session.transfer_cache.name(key))
        self.seconds += (_now() - start).total_seconds()
        return x_adv


def data_hash(indices: torch.Tensor) -> str:
    """Short hash of an evaluation subset."""
    return hashlib.sha256(indices.numpy().tobytes()).hexdigest()[:16]


def _scores(out: Outcome, n: int) -> dict[str, Any]:
    low, high = wilson_interval(count(out.robust), n)
    return {
        "n": n,
        "clean_acc": accuracy(out.clean),
        "robust_acc": accuracy(out.robust),
        "robust_ci_low": low,
        "robust_ci_high": high,
        "flag_loss_not_increasing": bool(out.adv_loss < out.clean_loss) if out.adv_loss else False,
    }


@contextlib.contextmanager
def _seeded_global_rng(cell_key: str, device: torch.device) -> Iterator[None]:
    """torch's global generators seeded from the cell and restored afterwards: a model that
    draws from them (undeclared randomness) gives the same numbers in any order of cells."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_key("cell", cell_key) % 2**63)
        yield


def _sample_rows(key: str, indices: torch.Tensor, out: Outcome) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {"cell_key": [], "sample": [], "version": [], "correct": []}
    runs = [(out.clean, torch.ones_like(out.clean)), *zip(out.versions, out.attacked, strict=True)]
    for version, (correct, ran) in enumerate(runs):
        where = ran.nonzero().squeeze(1)
        cols["sample"] += indices[where].tolist()
        cols["correct"] += correct[where].tolist()
        cols["version"] += [version - 1] * len(where)
    cols["cell_key"] = [key] * len(cols["sample"])
    return cols


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
