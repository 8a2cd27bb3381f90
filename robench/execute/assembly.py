"""The driver's book of unfinished cells: their prepared facts and stored parts.

Executors report each finished shard (:class:`~robench.execute.events.ShardDone`); the
driver stores it at once as a part of its cell (:class:`~robench.results.parts.PartStore`),
and when a cell's last part is in, assembles the cell's row from its parts
(:mod:`robench.execute.cellrow`). A rerun reads the parts already stored, so only the
missing shards are computed (:meth:`Assembly.todo`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from robench.cell import Cell
from robench.execute.cellrow import PartsMismatch
from robench.execute.events import CellPrepared, Event, Prepared, ShardDone
from robench.execute.shards import Part
from robench.results.parts import PartStore, shard_tag
from robench.results.storage import CellResult, set_aside


class _Session(Protocol):
    def shards(self, cell: Cell) -> list[slice]: ...

    def assemble(self, cell: Cell, prepared: Prepared, parts: list[Part]) -> CellResult: ...

    def error(self, cell: Cell, where: str, exc: BaseException) -> CellResult: ...


class Assembly:
    """Stores the parts of ``cells`` as they come and assembles each finished cell."""

    def __init__(
        self,
        session: _Session,
        store: PartStore,
        cells: Sequence[Cell],
        sizes: tuple[int, int],
        log: Callable[[str], None],
    ) -> None:
        """:param sizes: (shard size, batch size): parts of other sizes are not this run's"""
        self.session, self.store, self.log = session, store, log
        self.tag = shard_tag(*sizes)
        self.cells = {c.key: c for c in cells}
        self.count = {c.key: len(session.shards(c)) for c in cells}
        self.parts: dict[str, dict[int, Part]] = {}
        for cell in cells:
            stored = store.read(cell.key, self.tag, self.count[cell.key], log)
            self.parts[cell.key] = {i: Part.from_table(table) for i, table in stored.items()}
            if stored:
                log(f"resuming {cell.id}: {len(stored)}/{self.count[cell.key]} shards stored")
        self.prepared: dict[str, Prepared] = {}
        self.closed: set[str] = set()

    def todo(self, cell: Cell) -> list[int]:
        """The shards of ``cell`` not stored yet, in order."""
        return [i for i in range(self.count[cell.key]) if i not in self.parts[cell.key]]

    def feed(self, event: Event) -> CellResult | None:
        """Store what ``event`` brings; the cell's result when it finishes the cell (an error
        row is passed on once: later events of a failed cell are dropped)."""
        key = event.row["cell_key"] if isinstance(event, CellResult) else event.cell_key
        if key in self.closed:
            return None
        if isinstance(event, CellResult):
            self.closed.add(key)
            return event
        if isinstance(event, CellPrepared):
            self.prepared[key] = event.prepared
        elif isinstance(event, ShardDone):
            part = event.part
            self.store.write(key, self.tag, part.index, part.count, part.table(key))
            self.parts[key][part.index] = part
        return self._finished(key)

    def _finished(self, key: str) -> CellResult | None:
        parts, prepared = self.parts[key], self.prepared.get(key)
        if prepared is None or len(parts) < self.count[key]:
            return None
        self.closed.add(key)
        cell = self.cells[key]
        try:
            return self.session.assemble(cell, prepared, [parts[i] for i in sorted(parts)])
        except PartsMismatch as exc:  # parts of other code or another subset: never mixed in
            for path in sorted((self.store.folder / key).glob(f"{self.tag}-*.parquet")):
                set_aside(path)
            return self.session.error(cell, "stored shards (set aside; a rerun recomputes them)", exc)
