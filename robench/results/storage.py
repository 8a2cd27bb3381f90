"""The results schema, and the only code that writes or reads a run folder.

A run folder (``results/<run>/``) holds:

* ``cells/<cell key>.parquet``: one row per finished cell (schema :data:`CELL_SCHEMA`);
* ``samples/<cell key>.parquet``: per-sample outcomes of that cell (:data:`SAMPLE_SCHEMA`);
* ``manifest.json``: the resolved benchmark, the evaluation subset and the model hashes.

Each file is written to a hidden temporary name and renamed into place, so a crash never
leaves a half-written file that looks finished; pyarrow ignores hidden files when it reads
the folder as one dataset. A cell counts as finished once its ``cells/`` file exists; the
samples file is written first.

A file damaged afterwards (a copy cut short, a full disk) must not block the whole folder:
readers skip it with a :class:`DamagedFileWarning`, and resuming (:meth:`RunStore.finished`)
moves it aside as ``_<key>.parquet.damaged`` and recomputes its cell. The ``.damaged``
suffix keeps it out of robench's ``*.parquet`` reader, the leading underscore out of
pyarrow's (and Spark's) when they read the folder as one dataset.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from robench.errors import DamagedFileWarning
from robench.results.atomicfiles import atomic_bytes, atomic_parquet
from robench.results.columns import CELL_COLUMNS, SAMPLE_COLUMNS
from robench.results.columns import READABLE_VERSIONS as READABLE_VERSIONS  # re-exported for run-folder readers
from robench.results.columns import SCHEMA_VERSION as SCHEMA_VERSION


def _schema(columns: list[tuple[str, pa.DataType, str]]) -> pa.Schema:
    fields = [pa.field(n, t, metadata={"doc": d}) for n, t, d in columns]
    return pa.schema(fields, metadata={"robench_schema_version": str(SCHEMA_VERSION)})


CELL_SCHEMA = _schema(CELL_COLUMNS)
SAMPLE_SCHEMA = _schema(SAMPLE_COLUMNS)


@dataclass
class CellResult:
    """A finished (or failed) cell: its row and its per-sample outcomes. Picklable."""

    row: dict[str, Any]
    samples: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``ok`` or ``error``."""
        return str(self.row["status"])

    @property
    def cell_id(self) -> str:
        """The cell's readable id."""
        return str(self.row["cell_id"])


@dataclass(frozen=True)
class DamagedFile:
    """A file of a run folder that pyarrow cannot read, and why."""

    path: Path
    problem: str
    """The reader's error in one line, e.g. ``ArrowInvalid: Parquet magic bytes not found in footer...``."""

    @property
    def key(self) -> str:
        """The key of the cell the file belongs to (its name)."""
        return self.path.name.removesuffix(".parquet")

    def describe(self) -> str:
        """``damaged cell file PATH (PROBLEM)``, or ``damaged samples file ...``."""
        kind = "cell" if self.path.parent.name == "cells" else "samples"
        return f"damaged {kind} file {self.path} ({self.problem})"


TableName = Literal["cells", "samples"]


class RunStore:
    """Reads and writes one run folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def finished(self, report: Callable[[str], None] | None = None) -> dict[str, CellResult]:
        """Cells already stored with status ok, by cell key (these are skipped on resume).

        A damaged cell or samples file is moved aside (``_<key>.parquet.damaged``) and its
        cell left out, so the run recomputes it; ``report`` gets one line per file (default:
        a :class:`DamagedFileWarning`).
        """
        if not (self.path / "cells").is_dir():
            return {}
        say = report or _warn
        table, damaged = self.read_table("cells")
        damaged += self.read_table("samples")[1]
        unfinished = set()
        for file in damaged:
            say(f"{file.describe()}: moved to {set_aside(file.path).name}; the cell will be recomputed")
            unfinished.add(file.key)
        ok = table[(table["status"] == "ok") & ~table["cell_key"].isin(unfinished)]
        done = {str(row["cell_key"]): CellResult({str(k): v for k, v in row.items()}) for row in ok.to_dict("records")}
        for key in self._samples_set_aside(done):  # an earlier resume moved them, then stopped before recomputing
            say(f"samples file of cell {done[key].cell_id} was set aside as damaged; the cell will be recomputed")
            del done[key]
        return done

    def _samples_set_aside(self, keys: Iterable[str]) -> list[str]:
        """The keys whose samples file is absent because it was moved aside as damaged."""
        folder = self.path / "samples"
        return [
            key
            for key in keys
            if not (folder / f"{key}.parquet").exists() and (folder / f"_{key}.parquet.damaged").exists()
        ]

    def write(self, result: CellResult) -> Path:
        """Store one cell atomically: samples first, then the row that marks it finished.

        :raises ValueError: if the row or the samples do not match the schema (see
            :func:`check_row`): a bug in the code that made them, never silently stored
        """
        check_row(result)
        key = result.row["cell_key"]
        samples = result.samples or {name: [] for name in SAMPLE_SCHEMA.names}
        atomic_parquet(pa.Table.from_pydict(samples, schema=SAMPLE_SCHEMA), self.path / "samples" / f"{key}.parquet")
        target = self.path / "cells" / f"{key}.parquet"
        _write_row({**result.row, "schema_version": SCHEMA_VERSION}, target)
        return target

    def read_cells(self) -> pd.DataFrame:
        """Every stored cell as one table; a damaged file is skipped with a :class:`DamagedFileWarning`."""
        return _warned(self.read_table("cells"))

    def read_samples(self) -> pd.DataFrame:
        """Every stored per-sample outcome as one table; damaged files are skipped, as by :meth:`read_cells`."""
        return _warned(self.read_table("samples"))

    def read_table(self, name: TableName) -> tuple[pd.DataFrame, list[DamagedFile]]:
        """The ``cells`` or ``samples`` table, and the files skipped because they cannot be read."""
        return _read_folder(self.path / name, CELL_SCHEMA if name == "cells" else SAMPLE_SCHEMA)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write ``manifest.json`` atomically."""
        data = json.dumps({"schema_version": SCHEMA_VERSION, **manifest}, indent=2, sort_keys=True, default=str)
        atomic_bytes(data.encode(), self.path / "manifest.json")

    def rewrite_cells(self, table: pd.DataFrame) -> None:
        """Store updated rows (e.g. sanity flags) of finished cells, each atomically."""
        for row in table.to_dict("records"):
            _write_row(row, self.path / "cells" / f"{row['cell_key']}.parquet")

    def read_manifest(self) -> dict[str, Any]:
        """The run's manifest."""
        manifest: dict[str, Any] = json.loads((self.path / "manifest.json").read_text())
        return manifest


CROSS_CELL_FLAGS = (
    "flag_eps_not_monotonic",
    "flag_whitebox_above_transfer",
    "flag_large_eps_survives",
    "flag_randomized_without_eot",
)
"""Flags that compare cells: set over the whole folder after a run (robench/results/flags.py), so a
row is written without them."""
ERROR_ROW_COLUMNS = frozenset({"cell_key", "cell_id", "status", "error", "started_at", "finished_at"})
"""What an ``error`` row must hold at least; its measurements stay null."""


def check_row(result: CellResult) -> None:
    """Raise ``ValueError`` unless ``result`` matches the schema: no column the schema lacks, every
    column for an ``ok`` row (but ``schema_version``, which :meth:`RunStore.write` sets, and
    :data:`CROSS_CELL_FLAGS`), at least
    :data:`ERROR_ROW_COLUMNS` for an ``error`` row, and samples with exactly the samples columns."""
    names = set(CELL_SCHEMA.names)
    unknown = sorted(set(result.row) - names)
    status = result.row.get("status")
    required = names - {"schema_version", *CROSS_CELL_FLAGS} if status == "ok" else ERROR_ROW_COLUMNS
    missing = sorted(required - set(result.row))
    if unknown or missing or status not in ("ok", "error"):
        raise ValueError(
            f"cell row {result.row.get('cell_id', '?')} does not match the cells schema (status {status!r}): "
            f"unknown columns {unknown}, missing columns {missing}; add new columns to the schema in storage.py"
        )
    if result.samples and set(result.samples) != set(SAMPLE_SCHEMA.names):
        raise ValueError(f"samples columns {sorted(result.samples)} are not the schema's {SAMPLE_SCHEMA.names}")


def _write_row(row: dict[Any, Any], target: Path) -> None:
    """One cells row, atomically; a NaN (pandas' null) is null in a column that is not float."""
    values = {name: row.get(name) for name in CELL_SCHEMA.names}
    exact = {field.name for field in CELL_SCHEMA if not pa.types.is_floating(field.type)}
    data = {n: [None if n in exact and v != v else v] for n, v in values.items()}  # v != v: NaN
    atomic_parquet(pa.Table.from_pydict(data, schema=CELL_SCHEMA), target)


def describe_schema() -> Iterator[tuple[str, str, str, str]]:
    """(table, column, type, meaning) for every column: the documented schema."""
    for table, columns in (("cells", CELL_COLUMNS), ("samples", SAMPLE_COLUMNS)):
        for name, dtype, doc in columns:
            yield table, name, str(dtype), doc


def set_aside(path: Path) -> Path:
    """Rename a damaged file to ``_<name>.damaged`` (``.damaged.1``, ... if taken); return the new path."""
    target = path.with_name(f"_{path.name}.damaged")
    count = 0
    while target.exists():
        count += 1
        target = path.with_name(f"_{path.name}.damaged.{count}")
    path.rename(target)
    return target


def warn_damaged(file: DamagedFile) -> None:
    """Warn that ``file`` was skipped, in one line that says what to do about it."""
    _warn(f"{file.describe()}: skipped (restore it, or resume the run with `robench run` to recompute the cell)")


def _warn(message: str) -> None:
    warnings.warn(DamagedFileWarning(message), stacklevel=2)


def _warned(read: tuple[pd.DataFrame, list[DamagedFile]]) -> pd.DataFrame:
    for file in read[1]:
        warn_damaged(file)
    return read[0]


def _read_folder(folder: Path, schema: pa.Schema) -> tuple[pd.DataFrame, list[DamagedFile]]:
    files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".")) if folder.is_dir() else []
    damaged: list[DamagedFile] = []
    try:
        # One dataset read: fast, and it fills the columns older files lack with nulls.
        table = pq.ParquetDataset(files, schema=schema).read() if files else schema.empty_table()
    except (pa.ArrowException, OSError):
        # Only now look at each file: the healthy folder's read stays one call.
        damaged = [d for d in map(_damage, files) if d is not None]
        if not damaged:
            raise  # not a damaged file (e.g. another schema): the caller reports it
        good = [p for p in files if p not in {d.path for d in damaged}]
        table = pq.ParquetDataset(good, schema=schema).read() if good else schema.empty_table()
    frame: pd.DataFrame = table.to_pandas()
    return frame, damaged


def _damage(path: Path) -> DamagedFile | None:
    """Why ``path`` cannot be read as a parquet file, or None if it can."""
    try:
        with pq.ParquetFile(path) as handle:
            handle.read()
    except (pa.ArrowException, OSError) as exc:
        return DamagedFile(path, " ".join(f"{type(exc).__name__}: {exc}".split()))
    return None
