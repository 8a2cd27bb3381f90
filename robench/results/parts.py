"""The stored shards of a run folder's cells: ``parts/<cell key>/<tag>-<index>.parquet``.

A shard's outcomes are stored as soon as the shard is finished (:mod:`robench.execute.shards`
says what a part holds), each file written atomically, so a run killed mid-cell loses only
the shards in flight and the rerun computes only the missing ones. The ``tag`` names the
shard and batch sizes the parts were computed with: a rerun with other sizes cuts other
shards (and batch-seeded attacks draw other numbers), so it uses only the parts of its own
tag. Parts are kept after their cell is assembled, as the record of which device and host
computed each shard; deleting ``parts/`` loses nothing the cells and samples tables need.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from robench.results.atomicfiles import atomic_parquet
from robench.results.storage import RunStore, set_aside

_NAME = re.compile(r"^(?P<tag>s\d+-b\d+)-(?P<index>\d+)of(?P<count>\d+)\.parquet$")


def unfinished_lines(store: RunStore, finished: set[str]) -> list[str]:
    """``unfinished CELL_ID: k/K shards`` for each cell of ``store`` with parts but no row yet."""
    try:
        names = {c["key"]: c["id"] for c in store.read_manifest().get("cells", [])}
    except (FileNotFoundError, ValueError):
        names = {}
    progress = PartStore(store.path).progress()
    return [
        f"unfinished {names.get(key, key)}: {done}/{total} shards"
        for key, (done, total) in progress.items()
        if key not in finished
    ]


def shard_tag(shard_size: int, batch_size: int) -> str:
    """The tag of parts computed with these sizes, e.g. ``s500-b250``."""
    return f"s{shard_size}-b{batch_size}"


class PartStore:
    """Reads and writes the parts of one run folder."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = Path(run_dir) / "parts"

    def write(self, cell_key: str, tag: str, index: int, count: int, table: pa.Table) -> Path:
        """Store shard ``index`` of ``count`` of a cell, atomically."""
        target = self.folder / cell_key / f"{tag}-{index}of{count}.parquet"
        atomic_parquet(table, target)
        return target

    def read(self, cell_key: str, tag: str, count: int, report: Callable[[str], None]) -> dict[int, pa.Table]:
        """The stored parts of a cell with ``tag`` and ``count`` shards, by index. A part that
        cannot be read is set aside (``_<name>.damaged``) with a line to ``report``, and its
        shard computed again."""
        found: dict[int, pa.Table] = {}
        for path in self._files(cell_key):
            match = _NAME.match(path.name)
            assert match is not None
            if match["tag"] != tag or int(match["count"]) != count:
                continue
            try:
                found[int(match["index"])] = pq.read_table(path)
            except (pa.ArrowException, OSError) as exc:
                moved = set_aside(path)
                report(f"damaged part {path} ({type(exc).__name__}: {exc}): moved to {moved.name}; recomputing it")
        return found

    def progress(self) -> dict[str, tuple[int, int]]:
        """For each cell with parts: (parts stored, shards) of its most advanced tag."""
        out: dict[str, tuple[int, int]] = {}
        if not self.folder.is_dir():
            return out
        for cell in sorted(p for p in self.folder.iterdir() if p.is_dir()):
            counts: dict[tuple[str, int], int] = {}
            for path in self._files(cell.name):
                match = _NAME.match(path.name)
                assert match is not None
                tag = (match["tag"], int(match["count"]))
                counts[tag] = counts.get(tag, 0) + 1
            if counts:
                (_, total), done = max(counts.items(), key=lambda item: item[1] / item[0][1])
                out[cell.name] = (done, total)
        return out

    def _files(self, cell_key: str) -> list[Path]:
        folder = self.folder / cell_key
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("*.parquet") if _NAME.match(p.name))
