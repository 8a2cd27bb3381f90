"""What a distributed executor must know before it starts a task: the models a build needs
first, and the shared sets (and their surrogate models) a cell's shards need first.

Planned from the cells and the defenses' declarations, before any compute, so that the Ray
executor can pass each task what it depends on as task results (a task starts only when
they exist, and never holds a device while it waits). Two dependencies are known only once
a plugin ran, and are handled when they are known:

* the masking versions the model checks add to a cell (a transfer set from the ``baseline``
  surrogate) exist only after the cell's checks: their set tasks are submitted when the
  cell's build task returns its checks, before its shard tasks;
* a defense that does not declare the models it loads (:meth:`robench.Defense.requires`)
  builds them inside its own build task (under the cache locks, as the local executor
  does), holding that task's resources while they build.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol as Interface

import torch

import robench
from robench.cell import Cell, ModelKey
from robench.context import ImageData
from robench.discover.registry import Registries
from robench.execute.engine import Setup
from robench.execute.events import Event, Group, Prepared, ShardDone, Worker
from robench.execute.transfersource import SetSession, TransferSource
from robench.execute.versions import expand
from robench.plugin import PluginSpec
from robench.protocol import Protocol
from robench.results.storage import CellResult


class Session(SetSession, Worker, Interface):
    """What the task graph plans with, and its tasks run: a
    :class:`~robench.execute.session.Session` (an interface, to keep the modules acyclic)."""

    @property
    def registries(self) -> Registries:
        """The plugin registries."""
        ...

    @property
    def device_request(self) -> str:
        """The device the run asked for."""
        ...

    def data(self, dataset: str, split: str) -> ImageData:
        """A loaded split."""
        ...

    def eval_indices(self, dataset: str) -> torch.Tensor:
        """The evaluation subset."""
        ...

    def setup(self, cell: Cell) -> Setup:
        """How the cell's versions run."""
        ...

    def shards(self, cell: Cell) -> list[slice]:
        """The cell's shards."""
        ...

    def defense(self, key: ModelKey) -> robench.Defense:
        """The resolved defense of a model key."""
        ...

    def model_key(self, dataset: str, arch: str, spec: PluginSpec, seed: int) -> ModelKey:
        """The key of a defense spec's model."""
        ...

    def models(self, key: ModelKey) -> tuple[dict[str, torch.nn.Module], float, str]:
        """Build (or load) a model."""
        ...

    def prepare_group(self, group: Group) -> Iterator[Event]:
        """Build a target and prepare its cells."""
        ...

    def run_shard(self, cell: Cell, prepared: Prepared, index: int) -> ShardDone | CellResult:
        """Evaluate one shard."""
        ...


@dataclass(frozen=True)
class SetNeed:
    """One shared set a cell's shards read: its name (equal for every target that reads
    it), the version that makes it, and the surrogate models it is generated against."""

    name: str
    version_index: int
    label: str
    surrogates: tuple[ModelKey, ...]


def required_models(session: Session, key: ModelKey) -> list[ModelKey]:
    """The models ``key``'s build loads from other defenses (declared by the defense)."""
    defense = session.defense(key)
    return [session.model_key(key.dataset, key.arch, spec, key.seed) for spec in defense.requires()]


def set_needs(session: Session, cell: Cell, protocol: Protocol) -> list[SetNeed]:
    """The transfer or corruption sets ``cell``'s shards read under ``protocol``."""
    data = session.data(cell.model.dataset, "test")
    indices = session.eval_indices(cell.model.dataset)
    source = TransferSource(session, cell, protocol, session.setup(cell), data, indices)
    needs = []
    for version in expand(protocol, session.registries, cell.norm):
        if version.use.source is None:
            continue  # white-box: attacks the target itself
        surrogates: tuple[ModelKey, ...] = ()
        if not protocol.is_corruption():
            surrogate = protocol.surrogate(version.use.source)
            arch = surrogate.arch or cell.model.arch
            surrogates = tuple(
                session.model_key(cell.model.dataset, arch, surrogate.defense, seed) for seed in surrogate.seeds
            )
        needs.append(SetNeed(source.set_name(version), version.index, version.label, surrogates))
    return needs
