"""Trust on first use: the sha256 of each RobustBench weights file, recorded when it first loads.

robustbench 1.1.1 checks no hash at all; robench's shipped manifest cannot pin hashes nobody
could download where it was written. So a file the manifest does not pin is hashed when it
is first used, and once it has loaded into RobustBench's architecture, its sha256 is written
to ``<cache>/robustbench/pins.json``. Every later use must match: a file that changed (a
re-download of another release, a damaged copy) is refused with both hashes, never
evaluated silently. ``-D sha256=...`` and a manifest pin take precedence over the pin file;
``robench zoo pin`` turns the files at hand into a manifest a team commits.

The pin file is keyed by ``dataset/threat_model/file``, not by path: the same model in
another ``model_dir`` must be the same file. Writers hold a file lock and replace the file
atomically, so concurrent builds (Ray workers) never lose each other's pins.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

import robench

FORMAT = 1


@dataclass(frozen=True)
class Pin:
    """A recorded first use: the file's sha256, where it was, when."""

    sha256: str
    path: str
    first_used: str


def default_cache() -> Path:
    """robench's cache folder: ``$ROBENCH_CACHE``, else ``~/.cache/robench`` (as ``robench run``)."""
    value = os.environ.get("ROBENCH_CACHE", "")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "robench"


class Pins:
    """The pin file of one cache folder."""

    def __init__(self, cache_root: Path) -> None:
        self.path = Path(cache_root) / "robustbench" / "pins.json"

    def all(self) -> dict[str, Pin]:
        """Every pin, by ``dataset/threat_model/file``; an unreadable pin file is an error, not empty."""
        if not self.path.is_file():
            return {}
        try:
            pins = json.loads(self.path.read_text())["pins"]
            return {key: Pin(p["sha256"], p["path"], p["first_used"]) for key, p in pins.items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise robench.CacheError(
                f"the robustbench pin file {self.path} is unreadable ({exc!r}): restore it, or delete it to pin every "
                "file afresh at its next use"
            ) from exc

    def get(self, key: str) -> Pin | None:
        """The pin of ``dataset/threat_model/file``, if any."""
        return self.all().get(key)

    def record(self, key: str, sha256: str, path: Path) -> Pin:
        """Pin ``key`` to ``sha256`` unless it is pinned already; return the pin in force.

        A pin recorded meanwhile by another process wins; the caller compares.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            pins = self.all()
            if key in pins:
                return pins[key]
            now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            pins[key] = Pin(sha256, str(path), now)
            self._write(pins)
            return pins[key]

    def _write(self, pins: dict[str, Pin]) -> None:
        data = {
            "about": "sha256 of RobustBench weights files at their first use by robench (trust on first use); a file "
            "whose hash differs is refused. Delete an entry to accept a new file at its next use.",
            "format": FORMAT,
            "pins": {k: vars(p) for k, p in sorted(pins.items())},
        }
        fd, tmp = tempfile.mkstemp(prefix=".pins.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)


def check(pins: Pins, key: str, path: Path, found: str, expected: str | None) -> bool:
    """Refuse a file whose sha256 ``found`` is not the one expected; True if it is a first use.

    ``expected`` is the run's pin (``-D sha256``, or the manifest's): it alone decides.
    Without one, the pin file does; a file it has no pin for is a first use (the caller
    records it once the file has loaded).

    :raises robench.CacheError: with both hashes, and what to do if the new file is wanted
    """
    if expected is not None:
        if found != expected:
            raise robench.CacheError(
                f"robustbench weights file {path} has the wrong sha256: expected {expected}, found {found}. It is not "
                f"the file pinned for {key.rsplit('/', 1)[0]} (a partial download, another release or another "
                "model); delete it to download it again, or pin the new file (-D sha256=..., or a manifest)"
            )
        return False
    pin = pins.get(key)
    if pin is None:
        return True
    if found != pin.sha256:
        raise robench.CacheError(
            f"robustbench weights file {path} changed since its first use: its sha256 is {found}, but {pin.sha256} "
            f"was recorded at its first use ({pin.first_used}, {pin.path}) in {pins.path}. A changed file is "
            "refused, never evaluated: it may be damaged or another release. Delete it to download it again; or, "
            f"if the new file is the one you want, delete the entry {key!r} from {pins.path} (or pass "
            f"-D sha256={found})."
        )
    return False
