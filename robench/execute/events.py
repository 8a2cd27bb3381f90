"""What passes between a session and its executors: the unit of work (a model group and the
shards of its cells still to compute), the events a worker reports (picklable values, no
hooks), and what executors need of a session.

Executors depend on these interfaces, not on :mod:`robench.execute.session`, so that the
session can hand work to any executor without an import cycle.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from robench.cell import Cell, ModelKey
from robench.context import Progress
from robench.defense import Reference
from robench.execute.modelcheck import ModelChecks
from robench.execute.shards import Part
from robench.protocol import Protocol as EvalProtocol
from robench.results.storage import CellResult


@dataclass
class Group:
    """One model key and its cells: the unit the local executor runs.

    :param todo: for each cell, the indices of the shards still to compute (a rerun skips
        the stored ones); a cell missing here computes all of them
    """

    key: ModelKey
    cells: list[Cell]
    todo: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class CellStarted:
    """A cell's evaluation begins (its model group is built)."""

    cell_key: str


@dataclass(frozen=True)
class Prepared:
    """What every shard of a cell shares, computed once per cell after its model is built:
    the model checks' verdict (on the cell's first samples), the protocol the checks left
    (with the masking versions they may add), and the facts of the row that do not depend
    on the samples.

    :param checks: the model checks' findings
    :param protocol: the protocol the shards run
    :param declared_randomized: whether the defense declared the variant randomized
    :param facts: row columns of the variant (efficiency, randomized, eot, votes, files)
    :param build_seconds: the model's build time, charged to the group's first cell
    :param model_hash: the model cache folder's name
    :param started_at: when the cell's preparation started
    :param provenance: where and when the preparation ran (for the executors' timelines)
    :param reference: the variant's published evaluation, if it has one
    """

    checks: ModelChecks
    protocol: EvalProtocol
    declared_randomized: bool
    facts: dict[str, Any]
    build_seconds: float
    model_hash: str
    started_at: dt.datetime
    provenance: dict[str, Any] = field(default_factory=dict)
    reference: Reference | None = None


@dataclass(frozen=True)
class CellPrepared:
    """A cell's model checks are done: its shards may run."""

    cell_key: str
    prepared: Prepared


@dataclass(frozen=True)
class ShardDone:
    """One shard of a cell is finished: the driver stores it as a part of the cell."""

    cell_key: str
    part: Part


Event = CellStarted | CellPrepared | ShardDone | CellResult
"""What an executor yields: a cell started or was prepared, a shard finished, or a cell's
result (an ``error`` row; ok rows are assembled by the driver from the parts)."""


class Worker(Protocol):
    """What executors use of a :class:`~robench.execute.session.Session`."""

    @property
    def device(self) -> torch.device:
        """Where the session trains and attacks."""
        ...

    @property
    def progress(self) -> Progress:
        """Its progress reporting."""
        ...

    def work(self, group: Group) -> Iterator[Event]:
        """Build the group's model once, prepare its cells and compute their shards to do."""
        ...

    def recipe(self) -> Recipe:
        """A picklable recipe that rebuilds the session in another process."""
        ...

    def error(self, cell: Cell, where: str, exc: BaseException) -> CellResult:
        """The ``error`` row of ``cell``."""
        ...


class Recipe(Protocol):
    """A picklable description of a session (:class:`robench.execute.session.Recipe`)."""

    def open(self, device: torch.device, progress: Progress) -> Worker:
        """The session, rebuilt in this process on ``device``."""
        ...

    def identity(self) -> str:
        """Names the run the recipe rebuilds (a worker keeps one open session per run)."""
        ...
