"""The benchmark: what to evaluate, as one frozen value built from flags (or a file).

A :class:`Benchmark` names plugins and their parameters; :func:`robench.plan.grid.plan` resolves
and validates them against the registries before any compute.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from robench.context import NORMS, Norm, Threat
from robench.errors import ConfigError
from robench.plan.execution import Execution
from robench.plugin import PluginSpec
from robench.protocol import Protocol

PRESETS = ("smoke", "paper")
DEFAULT_SHARD_SIZE = 250
DEFAULT_DATASET = "fashion-mnist"
"""The dataset of a run that names none (robench run without --dataset, a benchmark file
without ``datasets``), unless the defenses' models are made for another."""
"""Samples per shard unless told otherwise. The tests' and smoke runs' few hundred samples
stay one shard or two; RobustBench's 10,000 CIFAR images under AutoAttack become 40 shards,
each minutes of work on one GPU for a WideResNet-28-10: 5 full rounds on 8 GPUs, where shards
of 500 would leave 4 of 8 GPUs idle in the last round (benchmarks/shards.py simulates both)."""
SAMPLE_ORDERS = ("random", "first")
"""How the evaluation subset is drawn from the test split: ``random`` (a reproducible draw
seeded by ``sample_seed``) or ``first`` (indices 0..n-1, in order, as RobustBench's
leaderboard evaluates)."""
EXCLUDE_KEYS = ("dataset", "arch", "defense", "variant", "protocol", "attack", "eps", "seed")
"""What an exclude entry may match on: the grid's axes, plus each defense's variants."""

Exclude = tuple[tuple[str, Any], ...]
"""One exclude entry: sorted ``(axis, value)`` pairs; a cell matching all of them is dropped."""


@dataclass(frozen=True)
class Benchmark:
    """Axes of an evaluation grid; the grid is their product.

    ``eps`` empty means each dataset's default eps for ``norm``. ``exclude`` entries are
    partial matches (tox style): :func:`robench.plan.grid.plan` drops every cell matching one.
    """

    name: str
    datasets: tuple[str, ...] = (DEFAULT_DATASET,)
    archs: tuple[str, ...] = ("cnn8",)
    defenses: tuple[PluginSpec, ...] = ()
    attacks: tuple[PluginSpec, ...] = ()
    protocols: tuple[PluginSpec, ...] = ()
    inline_protocols: tuple[Protocol, ...] = ()
    attack_settings: tuple[PluginSpec, ...] = ()
    """Protocol settings (``eot``, ``votes``) of the one-attack protocols of ``attacks``: one
    spec per attack name (``-P eot=40``; in a file ``[protocols.NAME]`` for an ``attack`` entry)."""
    norm: Norm = "linf"
    eps: tuple[float, ...] = ()
    seeds: tuple[int, ...] = (0,)
    preset: str = "smoke"
    n_samples: int = 1000
    sample_seed: int = 0
    batch_size: int = 250
    shard_size: int = DEFAULT_SHARD_SIZE
    """Samples per shard, the unit of work (DESIGN.md §7): a cell's subset is cut into
    shards of at most this many samples, in the order of its drawn indices."""
    exhaustive: bool = False
    exclude: tuple[Exclude, ...] = ()
    execution: Execution = field(default_factory=Execution, compare=False)
    """How it is executed (:mod:`robench.plan.execution`): changes no number, so it is in
    neither the config hash nor :meth:`to_json`."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    sample_order: str = "random"
    """:data:`SAMPLE_ORDERS`; in the config hash and the manifest only when not ``random``."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; use one of {', '.join(PRESETS)}")
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}; use one of {', '.join(NORMS)}")
        if not self.defenses or not (self.attacks or self.protocols or self.inline_protocols):
            raise ConfigError("a benchmark needs at least one defense and one attack or protocol")
        for eps in self.eps:
            Threat(self.norm, eps)  # an eps out of range fails here, before any plugin loads
        if self.sample_order not in SAMPLE_ORDERS:
            close = difflib.get_close_matches(str(self.sample_order), SAMPLE_ORDERS, n=1)
            hint = f" Did you mean: {close[0]}?" if close else ""
            orders = ", ".join(SAMPLE_ORDERS)
            raise ConfigError(f"unknown sample order {self.sample_order!r}.{hint} Use one of {orders}")
        if self.n_samples < 1 or self.batch_size < 1 or self.shard_size < 1:
            raise ConfigError("n_samples, batch_size and shard_size must be >= 1")
        if not self.seeds:
            raise ConfigError("a benchmark needs at least one seed")
        for entry in self.exclude:
            _check_exclude(entry)

    def to_json(self) -> dict[str, Any]:
        """Plain, JSON-ready form (for the manifest)."""
        out = asdict(self)
        out.pop("extra")
        out.pop("execution")
        for key in ("exclude", "attack_settings"):
            if not out[key]:
                del out[key]  # keeps the hashes (and run folders) of benchmarks written before them
        if self.sample_order == "random":
            del out["sample_order"]  # likewise: the default order is the one every earlier run used
        return out

    def config_hash(self) -> str:
        """Short hash of everything that defines the results (not of batch size or mode)."""
        data = self.to_json()
        for key in ("batch_size", "shard_size", "exhaustive", "name"):
            # these do not change the numbers of keyed attacks on deterministic models (DESIGN.md §5);
            # batch-seeded attacks and random models record them in every row instead
            data.pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


def exclude_entry(values: Mapping[str, Any]) -> Exclude:
    """An exclude entry from a mapping such as ``{"defense": "baseline", "eps": 0.1}``."""
    entry = tuple(sorted(values.items()))
    _check_exclude(entry)
    return entry


def _check_exclude(entry: Exclude) -> None:
    if not entry:
        raise ConfigError("an exclude entry needs at least one key; an empty one would drop every cell")
    for key, _ in entry:
        if key not in EXCLUDE_KEYS:
            close = difflib.get_close_matches(key, EXCLUDE_KEYS, n=1)
            hint = f" Did you mean: {close[0]}?" if close else ""
            raise ConfigError(f"exclude key {key!r} is not an axis.{hint} Use: {', '.join(EXCLUDE_KEYS)}")
