"""Atomic file writes for run folders: a hidden temporary file in the target's folder, fsynced,
then renamed into place, so a crash never leaves a half-written file under the final name
(robench/results/storage.py relies on it: a cell is finished once its file exists)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def atomic_parquet(table: pa.Table, target: Path) -> None:
    """Write ``table`` to ``target`` as parquet through a hidden temporary file in its folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        _fsync_replace(Path(tmp), target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_bytes(data: bytes, target: Path) -> None:
    """Write ``data`` to ``target`` through a hidden temporary file in its folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    try:
        _fsync_replace(Path(tmp), target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _fsync_replace(tmp: Path, target: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
