"""One benchmark's working state: loaded data, model building (cached), and cell evaluation.

The runner drives a :class:`Session`; executors call :meth:`Session.work` on model groups,
in this process or (rebuilt from its :class:`Recipe`) in a Ray worker. A session calls no
plugin hook: it reports events, and the driver calls the hooks. Failures are isolated per
cell: a plugin that raises yields an ``error`` row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import robench
from robench.attack import derive_key
from robench.cell import Cell, ModelKey
from robench.context import Context, ImageData, Progress
from robench.discover.registry import Registries
from robench.execute.corruption import corruption_columns, without_gradient_checks
from robench.execute.efficiency import measure
from robench.execute.engine import Setup, deterministic, evaluate
from robench.execute.eotcheck import eot_check, eot_columns
from robench.execute.events import CellStarted, Group
from robench.execute.modelcache import ModelCache, ModelFactory, data_fingerprint
from robench.execute.modelcheck import (
    CHECK_SAMPLES,
    ModelChecks,
    ModelContractError,
    as_evaluated,
    check_columns,
    check_model,
    with_masking_versions,
)
from robench.execute.numerics import cpu_provenance
from robench.execute.rows import now, sample_rows, scores
from robench.execute.transfersource import TransferSource
from robench.execute.versions import Ensemble, TransferCache, expand
from robench.plan.config import Benchmark
from robench.plan.grid import model_key, resolve_defense
from robench.plugin import PluginSpec
from robench.protocol import Protocol, Surrogate
from robench.results.storage import CellResult, RunStore
from robench.training import subset_indices


@dataclass
class Session:
    """Everything needed to evaluate groups of one benchmark."""

    benchmark: Benchmark
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

    def recipe(self) -> Recipe:
        """What a worker needs to rebuild this session (picklable: no plugin manager)."""
        return Recipe(
            self.benchmark, self.registries, self.store.path, self.cache.root, self.cache.frozen, self.provenance
        )

    def work(self, group: Group) -> Iterator[CellStarted | CellResult]:
        """Build the group's model once, then evaluate each of its cells: a
        :class:`CellStarted` before each cell's evaluation, then its result."""
        key = group.key
        self.progress.log(f"building {key.dataset}/{key.arch}/{key.defense_label}/seed={key.seed}")
        try:
            models, build_seconds, model_hash = self.models(key)
            defense = self.defense(key)
        except Exception as exc:  # a plugin bug must not lose the rest of the grid
            for cell in group.cells:
                yield self.error(cell, f"{key.defense}.build", exc)
            return
        for cell in group.cells:
            yield CellStarted(cell.key)
            try:
                make_variant = functools.partial(defense.variant, cell.variant, models[cell.variant])
                yield self._evaluate(cell, make_variant, build_seconds, model_hash)
            except ModelContractError as exc:
                yield self.error(cell, "model checks", exc)
            except Exception as exc:
                yield self.error(cell, f"protocol {cell.protocol.name}", exc)
            build_seconds = 0.0  # charged to the first cell of the group only

    def _evaluate(
        self, cell: Cell, make_variant: Callable[[], robench.Variant], build_seconds: float, model_hash: str
    ) -> CellResult:
        started = now()
        data = self.data(cell.model.dataset, "test")
        indices = self.eval_indices(cell.model.dataset)
        p = cell.protocol
        setup = Setup(
            key=json.dumps([cell.model.dataset, p.name, cell.norm, cell.eps, cell.model.seed]),
            batch_size=self.benchmark.batch_size,
            device=self.device,
            exhaustive=self.benchmark.exhaustive or p.is_corruption(),  # corruption accuracy needs every set
            votes=p.votes,
            eot=p.eot,
        )
        with _seeded_global_rng(cell.key, self.device):  # undeclared random models: reproducible per cell
            declared, checks = self._check(cell, make_variant, data, indices, setup)
            checks = without_gradient_checks(checks, p)
            variant = as_evaluated(declared, checks)
            protocol = self._masking_protocol(cell) if checks.vanishing else p
            versions = expand(protocol, self.registries, cell.norm)
            transfer = TransferSource(self, cell, protocol, setup, data, indices)
            out = evaluate(
                variant, versions, cell.threat, data, indices, setup=setup, transfer=transfer, progress=self.progress
            )
            eot = eot_check(variant, versions, out, cell.threat, data, indices, setup)
        eff = measure(
            declared.model,
            data.batch(indices[:1])[0].to(self.device),
            bits=declared.bits,
            counted=declared.attack_model,
            model_bytes=declared.model_bytes,
        )
        own = len(expand(p, self.registries, cell.norm))
        row = {
            **self._key_columns(cell),
            **scores(out, len(indices)),
            **check_columns(checks, declared.randomized, out, versions[own:] if checks.vanishing else []),
            **corruption_columns(p, versions, out),
            **eot_columns(eot),
            "status": "ok",
            "error": "",
            "n_versions": len(versions),
            "exhaustive": setup.exhaustive,
            "randomized": variant.randomized,
            "quantized_engine": variant.quantized_engine,
            "weights_sha256": declared.weights_sha256,
            "variant_config": declared.config,
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
            "transfer_generated": transfer.generated,
            "model_hash": model_hash,
            "started_at": started,
            "finished_at": now(),
        }
        row["check_seconds"] += 0.0 if eot is None else eot.seconds  # the EOT probe is a check too
        return CellResult(row, sample_rows(cell.key, indices, out))

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

    def error(self, cell: Cell, where: str, exc: BaseException) -> CellResult:
        """The ``error`` row of ``cell``, whose ``where`` raised ``exc`` (logged with its traceback)."""
        text = "".join(traceback.format_exception(exc))
        self.progress.log(f"ERROR {cell.id}: {where} raised {type(exc).__name__}: {exc}\n{text}")
        row = {
            **self._key_columns(cell),
            "status": "error",
            "error": f"{where}: {type(exc).__name__}: {exc}",
            "started_at": now(),
            "finished_at": now(),
        }
        return CellResult(row)


@dataclass(frozen=True)
class Recipe:
    """A session's picklable parts, to rebuild it in another process (a Ray worker): the
    registries hold plugin classes, which pickle by reference, so a worker sees exactly the
    driver's plugins and never scans entry points or calls a hook."""

    benchmark: Benchmark
    registries: Registries
    run_dir: Path
    cache_dir: Path
    frozen: Path | None
    provenance: dict[str, Any]

    def open(self, device: torch.device, progress: Progress) -> Session:
        """The session, on this process's ``device``; the rows' device and CPU columns are
        this process's (a worker's machine may differ from the driver's)."""
        provenance = {**self.provenance, "device": str(device), **cpu_provenance()}
        return Session(
            self.benchmark,
            self.registries,
            RunStore(self.run_dir),
            ModelCache(self.cache_dir, frozen=self.frozen),
            TransferCache(self.cache_dir),
            device,
            progress,
            provenance=provenance,
        )


@contextlib.contextmanager
def _seeded_global_rng(cell_key: str, device: torch.device) -> Iterator[None]:
    """torch's global generators seeded from the cell and restored afterwards: a model that
    draws from them (undeclared randomness) gives the same numbers in any order of cells."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_key("cell", cell_key) % 2**63)
        yield
