"""Reading a run folder for ``robench check`` and ``robench report``: cells and per-sample verdicts.

Unlike :meth:`robench.results.storage.RunStore.read_cells`, these refuse a folder they cannot use
(no ``cells/``, no readable cell, another schema version) with a :class:`RunFolderError`.
A damaged file is skipped with a warning that names it, so one bad file does not hide the
rest; :func:`load_run` also lists the damaged cell files, because ``robench check`` must
count their cells as missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pandas as pd

from robench.errors import RobenchError
from robench.results.storage import READABLE_VERSIONS, SCHEMA_VERSION, DamagedFile, RunStore, warn_damaged

T = TypeVar("T")


class RunFolderError(RobenchError):
    """A folder cannot be read as a robench run (missing, empty, or another schema version)."""


@dataclass(frozen=True)
class RunData:
    """A run folder's cells and per-sample verdicts."""

    path: Path
    cells: pd.DataFrame
    verdicts: dict[str, pd.DataFrame]
    """Per cell key: indexed by sample, bool columns ``robust`` (every stored outcome correct), ``clean``."""
    damaged: tuple[DamagedFile, ...] = ()
    """Cell files that could not be read (their cells are not in ``cells``)."""


def load_run(path: Path) -> RunData:
    """Read a run folder's cells and per-sample verdicts; :class:`RunFolderError` if it is not usable."""
    cells, damaged = _load_cells(Path(path))
    samples = _read(path, RunStore(path).read_samples)
    return RunData(Path(path), cells, sample_verdicts(samples), tuple(damaged))


def load_cells(path: Path) -> pd.DataFrame:
    """Read a run folder's cells table; :class:`RunFolderError` if it is not usable."""
    return _load_cells(Path(path))[0]


def _load_cells(path: Path) -> tuple[pd.DataFrame, list[DamagedFile]]:
    if not (path / "cells").is_dir():
        raise RunFolderError(f"{path} is not a robench run folder (it has no cells/ directory)")
    _check_manifest_schema(path)
    cells, damaged = _read(path, lambda: RunStore(path).read_table("cells"))
    for file in damaged:
        warn_damaged(file)
    if cells.empty:
        state = "every file in cells/ is damaged" if damaged else "cells/ is empty"
        raise RunFolderError(f"{path} holds no finished cells ({state})")
    versions = sorted({int(v) for v in cells["schema_version"].dropna()})
    if not versions or not set(versions) <= set(READABLE_VERSIONS):  # newer versions only added columns
        raise RunFolderError(_schema_message(path, versions))
    return cells.reset_index(drop=True), damaged


def _read(path: Path, reader: Callable[[], T]) -> T:
    try:
        return reader()
    except Exception as exc:  # pyarrow raises several types for a file of another schema
        raise RunFolderError(
            f"{path}: cannot read its tables with results schema version {SCHEMA_VERSION} ({exc}); "
            "rerun the benchmark with this robench"
        ) from exc


def _check_manifest_schema(path: Path) -> None:
    manifest = path / "manifest.json"
    if manifest.is_file():
        version = json.loads(manifest.read_text()).get("schema_version")
        if version not in READABLE_VERSIONS:
            raise RunFolderError(_schema_message(path, [version]))


def _schema_message(path: Path, versions: Sequence[object]) -> str:
    found = ", ".join(str(v) for v in versions) or "none"
    return (
        f"{path} was written with results schema version {found}, this robench reads version "
        f"{SCHEMA_VERSION}: rerun the benchmark (for a baseline: regenerate it) with this robench"
    )


def sample_verdicts(samples: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per cell key, per sample: ``robust`` iff every stored outcome is correct; ``clean`` = version -1;
    ``score``: the share of versions classified correctly (0 where none ran), the per-sample
    quantity whose mean is a corruption cell's ``robust_acc``."""
    out: dict[str, pd.DataFrame] = {}
    for key, group in samples.groupby("cell_key", sort=False):
        by_sample = group.groupby("sample")["correct"]
        clean = group[group["version"] == -1].set_index("sample")["correct"]
        score = group[group["version"] >= 0].groupby("sample")["correct"].mean()
        frame = pd.DataFrame({"robust": by_sample.all(), "clean": clean}).sort_index()
        out[str(key)] = frame.assign(score=score.reindex(frame.index).fillna(0.0).astype(float))
    return out
