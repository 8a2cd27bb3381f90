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
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import robench
from robench.cell import Cell, ModelKey
from robench.context import Context, ImageData, Progress
from robench.discover.registry import Registries
from robench.execute.cellrow import RowInputs, assemble_row
from robench.execute.engine import Setup
from robench.execute.events import CellPrepared, CellStarted, Event, Group, Prepared, ShardDone
from robench.execute.gradientpath import skip_gradient_versions
from robench.execute.modelcache import ModelCache, ModelFactory, data_fingerprint
from robench.execute.modelcheck import (
    ModelChecks,
    ModelContractError,
    with_masking_versions,
)
from robench.execute.numerics import cpu_provenance
from robench.execute.prepare import prepare_cell
from robench.execute.rows import now
from robench.execute.shardrun import evaluate_shard
from robench.execute.shards import Part, shard_seed, shard_slices
from robench.execute.versions import Ensemble, TransferCache, Version, expand
from robench.plan.config import Benchmark
from robench.plan.grid import model_key, resolve_defense
from robench.plugin import PluginSpec
from robench.protocol import Protocol, Surrogate
from robench.results.storage import CellResult, RunStore
from robench.training import subset_indices

_LOADED_MODELS = 4
"""Model keys a session keeps loaded: a cell's shards (and its surrogates) reuse them instead of
reading the cache again for every shard."""


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
    device_request: str = "auto"
    """The device the run asked for (``--device``): ``cpu`` keeps Ray's GPU tasks on the CPU."""
    _data: dict[tuple[str, str], ImageData] = field(default_factory=dict)
    _loaded: OrderedDict[ModelKey, tuple[dict[str, nn.Module], str]] = field(default_factory=OrderedDict)

    def data(self, dataset: str, split: str) -> ImageData:
        """A loaded split, loaded once per session."""
        if (dataset, split) not in self._data:
            loaded = self.registries.datasets.get(dataset).create().load(split)  # type: ignore[arg-type]
            self._data[dataset, split] = loaded
        return self._data[dataset, split]

    def eval_indices(self, dataset: str) -> torch.Tensor:
        """The reproducible evaluation subset of the test split (the first n with ``sample_order`` first)."""
        n = len(self.data(dataset, "test"))
        if self.benchmark.sample_order == "first":
            return torch.arange(min(n, self.benchmark.n_samples))
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
            cache_root=self.cache.root,
            get_models=lambda name, params: self.models(
                self.model_key(key.dataset, key.arch, PluginSpec.of(name, params), key.seed)
            )[0],
        )

    def models(self, key: ModelKey) -> tuple[dict[str, nn.Module], float, str]:
        """Build (or load) the models of ``key``: (variant -> model, build seconds, cache name).
        The last few keys stay loaded, so the shards of a cell do not read them again."""
        if key in self._loaded:
            self._loaded.move_to_end(key)
            models, name = self._loaded[key]
            return models, 0.0, name
        defense = self.defense(key)
        fingerprint = data_fingerprint(self.data(key.dataset, "train"))
        models, seconds, name = self.cache.get(key, defense, lambda: self.context(key), fingerprint)
        self._loaded[key] = models, name
        if len(self._loaded) > _LOADED_MODELS:
            self._loaded.popitem(last=False)
        return models, seconds, name

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

    def work(self, group: Group) -> Iterator[Event]:
        """The local executor's unit: build the group's model once, prepare each cell (model
        checks), then compute its shards still to do, in order (:class:`~robench.execute.events.Group`)."""
        for event in self.prepare_group(group):
            yield event
            if not isinstance(event, CellPrepared):
                continue
            cell = next(c for c in group.cells if c.key == event.cell_key)
            for index in group.todo.get(cell.key, range(len(self.shards(cell)))):
                done = self.run_shard(cell, event.prepared, index)
                yield done
                if isinstance(done, CellResult):  # an error row: the cell's other shards are moot
                    break

    def prepare_group(self, group: Group) -> Iterator[CellStarted | CellPrepared | CellResult]:
        """Build (or load) the group's model, then prepare each of its cells: a
        :class:`CellStarted`, then its :class:`CellPrepared` (or an ``error`` row)."""
        key = group.key
        what = f"{key.dataset}/{key.evaluated_arch}/{key.defense_label}/seed={key.seed}"
        self.progress.log(f"building {what}")
        started = now()
        try:
            models, build_seconds, model_hash = self.models(key)
            defense = self.defense(key)
        except Exception as exc:  # a plugin bug must not lose the rest of the grid
            for cell in group.cells:
                yield self.error(cell, f"{key.defense}.build", exc)
            return
        # off a terminal, bars print only every minute: these lines show each phase in a log
        self.progress.log(
            f"built {what} in {build_seconds:.1f} s" if build_seconds else f"{what}: from the model cache"
        )
        build = {"build_started": started.timestamp(), "build_finished": now().timestamp()}
        for cell in group.cells:
            self.progress.log(f"cell {cell.id}: started")
            yield CellStarted(cell.key)
            try:
                make_variant = functools.partial(defense.variant, cell.variant, models[cell.variant])
                prepared = self.prepare(cell, make_variant, build_seconds, model_hash)
                yield CellPrepared(cell.key, dataclasses.replace(prepared, provenance={**build, **prepared.provenance}))
            except ModelContractError as exc:
                yield self.error(cell, "model checks", exc)
            except Exception as exc:
                yield self.error(cell, f"protocol {cell.protocol.name}", exc)
            build_seconds = 0.0  # charged to the first cell of the group only

    def shards(self, cell: Cell) -> list[slice]:
        """The shards of ``cell``'s evaluation subset (:func:`~robench.execute.shards.shard_slices`)."""
        return shard_slices(len(self.eval_indices(cell.model.dataset)), self.benchmark.shard_size)

    def setup(self, cell: Cell) -> Setup:
        """How ``cell``'s versions run."""
        p = cell.protocol
        return Setup(
            key=json.dumps([cell.model.dataset, p.name, cell.norm, cell.eps, cell.model.seed]),
            batch_size=self.benchmark.batch_size,
            device=self.device,
            exhaustive=self.benchmark.exhaustive or p.is_corruption(),  # corruption accuracy needs every set
            votes=p.votes,
            eot=p.eot,
        )

    def prepare(
        self, cell: Cell, make_variant: Callable[[], robench.Variant], build_seconds: float, model_hash: str
    ) -> Prepared:
        """The model checks of ``cell`` on its first samples, and what its shards share."""
        with _seeded_global_rng(shard_seed(cell.key, 0), self.device):  # undeclared random models: reproducible
            return prepare_cell(self, cell, make_variant, build_seconds, model_hash)

    def run_shard(self, cell: Cell, prepared: Prepared, index: int) -> ShardDone | CellResult:
        """Shard ``index`` of ``cell`` as a :class:`ShardDone`, or the cell's ``error`` row."""
        try:
            return ShardDone(cell.key, self.shard(cell, prepared, index))
        except Exception as exc:
            return self.error(cell, f"protocol {cell.protocol.name}", exc)

    def shard(self, cell: Cell, prepared: Prepared, index: int) -> Part:
        """Evaluate shard ``index`` of ``cell`` (:func:`~robench.execute.shardrun.evaluate_shard`)."""
        with _seeded_global_rng(shard_seed(cell.key, index), self.device):
            return evaluate_shard(self, cell, prepared, index)

    def assemble(self, cell: Cell, prepared: Prepared, parts: list[Part]) -> CellResult:
        """The cell's row and samples from its prepared facts and all of its parts."""
        indices = self.eval_indices(cell.model.dataset)
        versions = self.versions(cell, prepared)
        own = len(expand(cell.protocol, self.registries, cell.norm))
        return assemble_row(
            RowInputs(cell, prepared, parts, versions, own, self.benchmark.batch_size, self.benchmark.shard_size),
            self.key_columns(cell),
            indices,
        )

    def versions(self, cell: Cell, prepared: Prepared) -> list[Version]:
        """The versions ``cell``'s shards run: its prepared protocol's, those that need a gradient
        skipped when the checks found no gradient path."""
        versions = expand(prepared.protocol, self.registries, cell.norm)
        return skip_gradient_versions(versions, self.registries, prepared.checks.no_gradient)

    def masking_protocol(self, cell: Cell, checks: ModelChecks) -> Protocol:
        """The cell's protocol with the masking diagnosis's transfer and Square versions."""
        baseline = next((s for s in self.benchmark.defenses if s.name == "baseline"), PluginSpec("baseline"))
        return with_masking_versions(
            cell.protocol, self.registries, baseline, self.benchmark.preset, no_gradient=bool(checks.no_gradient)
        )

    def key_columns(self, cell: Cell) -> dict[str, Any]:
        """The columns that name ``cell``, and the run's provenance."""
        m = cell.model
        return {
            "cell_key": cell.key,
            "cell_id": cell.id,
            "dataset": m.dataset,
            "arch": m.evaluated_arch,
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
            "sample_order": cell.sample_order,
            **self.provenance,
        }

    def error(self, cell: Cell, where: str, exc: BaseException) -> CellResult:
        """The ``error`` row of ``cell``, whose ``where`` raised ``exc`` (a bug is logged with its traceback;
        a :class:`robench.RobenchError` says what to do already, and the runner prints it with the row)."""
        if not isinstance(exc, robench.RobenchError):
            text = "".join(traceback.format_exception(exc))
            self.progress.log(f"ERROR {cell.id}: {where} raised {type(exc).__name__}: {exc}\n{text}")
        row = {
            **self.key_columns(cell),
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

    def identity(self) -> str:
        """Names the run this recipe rebuilds: its folders and configuration."""
        return json.dumps([str(self.run_dir), str(self.cache_dir), self.provenance.get("config_hash")])

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
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global generators seeded with ``seed`` (:func:`~robench.execute.shards.shard_seed`)
    and restored afterwards: a model that draws from them (undeclared randomness) gives the
    same numbers in any order of cells and shards, on any device of a cluster."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
