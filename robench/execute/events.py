"""What passes between a session and its executors: the unit of work (a model group), the
events a worker reports (picklable values, no hooks), and what executors need of a session.

Executors depend on these interfaces, not on :mod:`robench.execute.session`, so that the
session can hand work to any executor without an import cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from robench.cell import Cell, ModelKey
from robench.context import Progress
from robench.results.storage import CellResult


@dataclass
class Group:
    """One model key and its cells: the unit an executor runs."""

    key: ModelKey
    cells: list[Cell]


@dataclass(frozen=True)
class CellStarted:
    """A cell's evaluation begins (its model group is built)."""

    cell_key: str


Event = CellStarted | CellResult
"""What an executor yields: a cell started, or a cell's result (ok or error)."""


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
        """Build the group's model once and evaluate its cells."""
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
