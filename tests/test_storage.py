"""RunStore.write stores exactly the schema: rows that do not match it are bugs, never stored."""

from __future__ import annotations

from pathlib import Path

import pytest

from robench.results.storage import CELL_SCHEMA, CROSS_CELL_FLAGS, SAMPLE_SCHEMA, CellResult, RunStore


def _ok_row() -> dict[str, object]:
    skip = {"schema_version", *CROSS_CELL_FLAGS}
    row: dict[str, object] = {name: None for name in CELL_SCHEMA.names if name not in skip}
    return {**row, "cell_key": "k", "cell_id": "a/b", "status": "ok", "error": ""}


def test_a_complete_row_is_stored(tmp_path: Path) -> None:
    RunStore(tmp_path).write(CellResult(_ok_row(), {name: [] for name in SAMPLE_SCHEMA.names}))
    assert list(RunStore(tmp_path).read_cells()["cell_key"]) == ["k"]


def test_a_column_the_schema_lacks_is_refused_not_dropped(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown columns \['robust_acc_typo'\], missing columns \[\]"):
        RunStore(tmp_path).write(CellResult({**_ok_row(), "robust_acc_typo": 0.5}))
    assert not (tmp_path / "cells").exists()


def test_an_ok_row_missing_a_column_is_refused_not_nulled(tmp_path: Path) -> None:
    row = _ok_row()
    del row["robust_acc"]
    with pytest.raises(ValueError, match=r"missing columns \['robust_acc'\]"):
        RunStore(tmp_path).write(CellResult(row))


def test_an_error_row_needs_only_its_identity_and_message(tmp_path: Path) -> None:
    row = {"cell_key": "e", "cell_id": "a/c", "status": "error", "error": "boom", "started_at": None}
    with pytest.raises(ValueError, match=r"missing columns \['finished_at'\]"):
        RunStore(tmp_path).write(CellResult(row))
    RunStore(tmp_path).write(CellResult({**row, "finished_at": None}))


def test_samples_with_other_columns_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="samples columns"):
        RunStore(tmp_path).write(CellResult(_ok_row(), {"cell_key": ["k"], "sample": [1]}))
