"""Executors run model groups and hand back cell results, in any order.

A group (one model key and its cells) is the unit of work: its model is built once and
every cell of it evaluated. Groups are independent and results picklable, so a distributed
executor (Ray, later) can run them anywhere; the driver alone stores results and calls hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

from robench.results.storage import CellResult

G = TypeVar("G")


class Executor(Protocol):
    """Runs ``work`` on every group and yields each cell result as soon as it exists."""

    name: str

    def map(self, work: Callable[[G], Iterator[CellResult]], groups: Sequence[G]) -> Iterator[CellResult]:
        """Yield the results of ``work(group)`` for every group."""
        ...


class LocalExecutor:
    """In-process, one group after another (the default)."""

    name = "local"

    def map(self, work: Callable[[G], Iterator[CellResult]], groups: Sequence[G]) -> Iterator[CellResult]:
        """Run the groups in order in this process."""
        for group in groups:
            yield from work(group)
