"""How a benchmark is executed: which executor, and what each of its tasks may use.

None of this changes a number (DESIGN.md §5: results do not depend on the executor), so it
is kept out of the benchmark's config hash and run folder name. It comes from a benchmark
file's ``[execution]`` table, overridden by ``robench run``'s flags.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from robench.errors import ConfigError

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Execution:
    """Executor settings.

    :param executor: ``local`` (in-process, one model group after another, each cell's shards
        in order) or ``ray`` (a Ray task graph: one task per build, shared set and shard)
    :param address: the Ray cluster to join (``ray start --head`` prints it; ``auto`` finds
        a running one); empty starts a private cluster on this machine
    :param gpus_per_task: GPUs each Ray task requests (0.5: two shard tasks per GPU); tasks
        then train and attack on CUDA (with ``--device cpu``, on the CPU: GPUs are then Ray's
        logical resources only)
    :param cpus_per_task: CPU cores each Ray task requests, and the torch threads it uses;
        0 means as many as this process uses (what the local executor would use, so that
        the numbers are exactly the local executor's: float reductions depend on the
        thread count)
    :param max_retries: how often Ray reruns a task whose worker died (killed, out of
        memory, lost node) before its unfinished cells are stored as ``error`` rows
    """

    executor: str = "local"
    address: str = ""
    gpus_per_task: float = 0.0
    cpus_per_task: int = 0
    max_retries: int = 2

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            close = difflib.get_close_matches(self.executor, EXECUTORS, n=1)
            hint = f" Did you mean: {close[0]}?" if close else ""
            raise ConfigError(f"unknown executor {self.executor!r}.{hint} Use one of: {', '.join(EXECUTORS)}")
        if self.executor == "local":
            given = [f.name for f in fields(self) if f.name != "executor" and getattr(self, f.name) != f.default]
            if given:
                raise ConfigError(
                    f"{', '.join(given)} only apply to the ray executor; add --executor ray "
                    '(or executor = "ray" in [execution]) or drop them'
                )
        if self.gpus_per_task < 0 or self.cpus_per_task < 0 or self.max_retries < 0:
            raise ConfigError("gpus_per_task, cpus_per_task and max_retries must be >= 0")


def execution_from_table(table: Mapping[str, Any]) -> Execution:
    """The settings of a benchmark file's ``[execution]`` table (keys as :class:`Execution`'s)."""
    known = {f.name: f.type for f in fields(Execution)}
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean: {close[0]}?" if close else ""
            raise ConfigError(f"[execution] key {key!r} is unknown.{hint} Use: {', '.join(known)}")
    kinds: dict[str, tuple[tuple[type, ...], str]] = {
        "executor": ((str,), "a string"),
        "address": ((str,), "a string"),
        "gpus_per_task": ((int, float), "a number"),
        "cpus_per_task": ((int,), "an integer"),
        "max_retries": ((int,), "an integer"),
    }
    for key, value in table.items():
        types, wanted = kinds[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ConfigError(f"[execution] {key} must be {wanted}, got {value!r}")
    values = dict(table)
    if "gpus_per_task" in values:
        values["gpus_per_task"] = float(values["gpus_per_task"])
    return Execution(**values)


def with_overrides(base: Execution, **flags: Any) -> Execution:
    """``base`` with the command-line flags that were given (None: not given); ``--executor
    local`` drops the file's Ray settings with its executor."""
    given = {k: v for k, v in flags.items() if v is not None}
    if given.get("executor") == "local":
        base = Execution()
    merged = {f.name: getattr(base, f.name) for f in fields(Execution)} | given
    return Execution(**merged)
