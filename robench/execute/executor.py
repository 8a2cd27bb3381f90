"""Executors run model groups and hand back, in any order, what happens to their cells.

A group (one model key and its cells) is the unit of work: its model is built once and
every cell of it evaluated. Groups are independent and their events picklable, so the Ray
executor (:mod:`robench.execute.rayexec`) runs them anywhere. Workers never call plugin
hooks: they report events (:mod:`robench.execute.events`) and
the driver alone calls ``robench_cell_start`` / ``robench_cell_finish`` and stores results.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from robench.errors import ConfigError
from robench.execute.events import CellStarted, Event, Group, Worker
from robench.plan.execution import Execution

__all__ = ["CellStarted", "Event", "Executor", "Group", "LocalExecutor", "make_executor"]


class Executor(Protocol):
    """Runs every group of a session and yields each event as soon as it happens."""

    name: str

    def map(self, session: Worker, groups: Sequence[Group]) -> Iterator[Event]:
        """Yield the events of ``session.work(group)`` for every group."""
        ...


class LocalExecutor:
    """In-process, one group after another (the default)."""

    name = "local"

    def map(self, session: Worker, groups: Sequence[Group]) -> Iterator[Event]:
        """Run the groups in order in this process."""
        for group in groups:
            yield from session.work(group)


def make_executor(execution: Execution) -> Executor:
    """The executor ``execution`` names; the Ray one fails before any compute without Ray."""
    if execution.executor == "local":
        return LocalExecutor()
    try:
        import ray  # noqa: F401  (the optional extra: checked here, before any compute)
    except ImportError:
        raise ConfigError("--executor ray needs Ray, which is not installed: pip install 'robench[ray]'") from None
    from robench.execute.rayexec import RayExecutor

    return RayExecutor(execution)
