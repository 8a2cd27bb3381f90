"""Hook specifications: every extension point robench calls.

Implement a hook with ``@robench.hookimpl`` in a module listed under
``[project.entry-points.robench]`` in your package's pyproject.toml::

    [project.entry-points.robench]
    foo = "robench_foo"

Registration hooks return classes; every other hook observes a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from robench.architecture import Architecture
    from robench.attack import Attack
    from robench.cell import Cell
    from robench.dataset import Dataset
    from robench.defense import Defense
    from robench.plan.config import Benchmark
    from robench.protocol import ProtocolDef
    from robench.results.storage import CellResult

__all__ = [
    "robench_architectures",
    "robench_attacks",
    "robench_cell_finish",
    "robench_cell_start",
    "robench_commands",
    "robench_configure",
    "robench_datasets",
    "robench_defenses",
    "robench_modify_plan",
    "robench_protocols",
    "robench_session_finish",
]

hookspec = pluggy.HookspecMarker("robench")


# -- Registration: called once, when robench builds its registries -----------


@hookspec
def robench_attacks() -> Sequence[type[Attack]]:
    """Return the attack classes this plugin provides.

    Each class subclasses :class:`robench.Attack` and sets a unique lowercase ``name``.

    Example::

        @robench.hookimpl
        def robench_attacks():
            return [PGD]
    """
    raise NotImplementedError  # a specification: plugins implement it


@hookspec
def robench_defenses() -> Sequence[type[Defense]]:
    """Return the defense classes this plugin provides (see :class:`robench.Defense`).

    Example::

        @robench.hookimpl
        def robench_defenses():
            return [Baseline, AdversarialTraining]
    """
    raise NotImplementedError  # a specification: plugins implement it


@hookspec
def robench_datasets() -> Sequence[type[Dataset]]:
    """Return the dataset classes this plugin provides (see :class:`robench.Dataset`).

    Example::

        @robench.hookimpl
        def robench_datasets():
            return [FashionMNIST]
    """
    raise NotImplementedError  # a specification: plugins implement it


@hookspec
def robench_architectures() -> Sequence[type[Architecture]]:
    """Return the architecture classes this plugin provides (see :class:`robench.Architecture`).

    Example::

        @robench.hookimpl
        def robench_architectures():
            return [CNN8, ResNet20]
    """
    raise NotImplementedError  # a specification: plugins implement it


@hookspec
def robench_protocols() -> Sequence[type[ProtocolDef]]:
    """Return the evaluation protocol classes this plugin provides (see :class:`robench.ProtocolDef`).

    Example::

        @robench.hookimpl
        def robench_protocols():
            return [WhiteboxPGD, BlackboxDverge]
    """
    raise NotImplementedError  # a specification: plugins implement it


@hookspec
def robench_commands() -> Sequence[click.Command]:
    """Return extra ``robench`` subcommands. Names must not clash with built-in ones.

    Example::

        @robench.hookimpl
        def robench_commands():
            return [my_click_command]
    """
    raise NotImplementedError  # a specification: plugins implement it


# -- Session: called by the runner, in this order ------------------------------


@hookspec
def robench_configure(benchmark: Benchmark) -> None:
    """Called once after the benchmark is resolved and validated, before any compute.

    :param benchmark: the resolved benchmark; read-only
    """


@hookspec
def robench_modify_plan(benchmark: Benchmark, cells: list[Cell]) -> None:
    """May filter or reorder ``cells`` in place before anything executes.

    :param benchmark: the resolved benchmark
    :param cells: the planned cells, in execution order
    """


@hookspec
def robench_cell_start(cell: Cell) -> None:
    """Called before each cell is evaluated (after its model group is built).

    :param cell: the cell about to be evaluated
    """


@hookspec
def robench_cell_finish(cell: Cell, result: CellResult) -> None:
    """Called after each cell, once its result is stored.

    :param cell: the cell that finished
    :param result: its stored result; ``result.status`` is ``"ok"`` or ``"error"``
    """


@hookspec
def robench_session_finish(benchmark: Benchmark, results: Sequence[CellResult]) -> None:
    """Called once after the last cell, e.g. to upload or summarise results.

    :param benchmark: the resolved benchmark
    :param results: every result of this session, skipped (already finished) cells included
    """
