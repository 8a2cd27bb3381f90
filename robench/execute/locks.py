"""Cross-process locks on the cache, so that a model or a transfer set is produced once.

Two tasks of the Ray executor (or two ``robench run`` processes sharing a cache) may need the
same model (a surrogate that is also a target) or the same transfer set at the same time.
The first takes the item's lock and produces it; the others wait on the lock, then find it
in the cache. Locks are ``filelock`` file locks (``flock``) under ``<cache>/locks/``: they
hold across processes on one machine, and across machines on a shared filesystem with
POSIX locks (NFSv4, Lustre, GPFS); a process that dies releases its locks with it.

Lock order never cycles: a transfer set's lock is taken before its surrogates' model
locks, and a model build takes only the locks of the models it starts from (a DAG).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

WAIT_NOTICE_SECONDS = 5.0
"""After this long waiting on a lock, say what is being waited for (once)."""


class CacheLocks:
    """Named locks in ``<root>/locks/``."""

    def __init__(self, root: Path) -> None:
        self.folder = Path(root) / "locks"
        self.waited = 0.0
        """Seconds this process spent waiting for locks other processes held (the Ray
        executor's tasks record it: a task that waits holds its CPUs or GPU idle)."""

    @contextmanager
    def hold(self, name: str, what: str, log: Callable[[str], None]) -> Iterator[None]:
        """Hold the lock ``name`` (any text) while the block runs; ``what`` names the item in
        the line logged when another process holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(name.encode()).hexdigest()[:24]
        lock = FileLock(self.folder / f"{digest}.lock")
        try:
            lock.acquire(timeout=WAIT_NOTICE_SECONDS)
        except Timeout:
            log(f"waiting for another process producing {what}")
            start = time.monotonic() - WAIT_NOTICE_SECONDS
            lock.acquire()
            self.waited += time.monotonic() - start
            log(f"{what}: waited {time.monotonic() - start:.0f} s; reading it from the cache")
        try:
            yield
        finally:
            lock.release()
