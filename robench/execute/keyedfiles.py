"""Tensors stored on disk under a content key: the transfer and corruption set caches.

A file's name is a hash of its key (canonical JSON), and the file holds the key itself, so a
file is only ever read back for the key it was written for. Writes go to a temporary name in
the same folder and are renamed into place (``os.replace``): a kill leaves the old file or
the new one, never half of one. Reads use ``weights_only=True``; an unreadable file (damaged,
truncated) is a miss, so the set is produced again instead of failing the cell.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class KeyedFiles:
    """One folder of keyed files."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def name(self, key: dict[str, object]) -> str:
        """The file name of ``key`` (recorded in result rows)."""
        return f"{hashlib.sha256(canonical(key).encode()).hexdigest()[:24]}.pt"

    def path(self, key: dict[str, object]) -> Path:
        """Where ``key``'s file is stored."""
        return self.root / self.name(key)

    def load(self, key: dict[str, object]) -> dict[str, Any] | None:
        """The stored entries of ``key``'s file, or None if it is missing, unreadable or was
        written for another key."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # damaged or truncated: a miss, produced again
            return None
        if not isinstance(stored, dict) or stored.get("key") != canonical(key):
            return None
        return stored

    def save(self, key: dict[str, object], entries: dict[str, Any]) -> None:
        """Store ``entries`` (tensors, strings) with ``key``, atomically; a concurrent writer
        of the same key writes the same content."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            torch.save({"key": canonical(key), **entries}, tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)


def canonical(key: dict[str, object]) -> str:
    """``key`` as canonical JSON (sorted keys; other values by ``str``)."""
    return json.dumps(key, sort_keys=True, default=str)
