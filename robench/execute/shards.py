"""Shards: a cell's evaluation subset cut into fixed slices, each evaluated on its own.

A shard is the unit of work (DESIGN.md §7): the subset's drawn indices, in order, cut into
slices of at most ``shard_size`` samples. A shard runs its own clean pass and versions, with
early exit and survivors re-packed within the shard, so shards can run on any device in any
order and a cell is the union of its shards. Every executor computes the same shards.

What a shard computes is a :class:`Part`: the shard's per-sample outcomes and the counters
the cell's row sums. A part is stored as soon as it is finished (:mod:`robench.results.parts`),
so a run killed mid-cell loses only the shards in flight; the cell's row is assembled from
its parts when the last one is in (:func:`concat`).

Keyed attacks on deterministic models give each sample the same verdict in any shard, so
their numbers do not depend on the shard size. Batch-seeded attacks (torchattacks' APGD,
Square, AutoAttack) and models that draw from torch's global generator give numbers that are
a function of the shard (its samples, and :func:`shard_seed`) and of the batch size; rows
record both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor

from robench.attack import derive_key
from robench.execute.engine import Outcome
from robench.execute.rows import sample_rows
from robench.results.metrics import all_or_nothing
from robench.results.storage import SAMPLE_SCHEMA

PART_METADATA = b"robench_part"
"""Key of a part file's schema metadata: the part's counters and provenance, as JSON."""


def shard_slices(n: int, size: int) -> list[slice]:
    """The shards of a subset of ``n`` samples: consecutive slices of at most ``size``."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def shard_seed(cell_key: str, index: int) -> int:
    """The seed of torch's global generators while shard ``index`` of a cell runs.

    Shard 0 keeps the seed the whole cell had before cells were sharded, so a one-shard
    cell's numbers are unchanged; every later shard gets its own seed from the cell and its
    index, never from the device or the order in which shards ran.
    """
    key = derive_key("cell", cell_key) if index == 0 else derive_key("cell", cell_key, "shard", index)
    return key % 2**63


@dataclass
class Part:
    """What one shard computed: its outcomes and the counters a cell's row sums.

    :param index: the shard's index in its cell (0-based)
    :param count: how many shards the cell has
    :param indices: the shard's samples (indices into the test split)
    :param outcome: the engine's outcome on those samples
    :param versions: the labels of the versions that ran (the cell's, in order)
    :param transfer_seconds: part of the outcome's seconds spent reading or generating sets
    :param transfer_used: the cached sets the shard read
    :param transfer_generated: how many of them this shard generated
    :param provenance: where and when it ran (device, host, pid, started, finished, the
        seconds it waited on cache locks), kept in the part file
    :param cell_columns: row columns measured once per cell, with shard 0: the indicators
        of attack failure (on the cell's check samples) and the EOT probe; empty for the
        other shards
    :param probe_seconds: seconds the EOT probe took (a check: added to ``check_seconds``)
    """

    index: int
    count: int
    indices: Tensor
    outcome: Outcome
    versions: list[str]
    transfer_seconds: float = 0.0
    transfer_used: list[str] = field(default_factory=list)
    transfer_generated: int = 0
    provenance: dict[str, Any] = field(default_factory=dict)
    cell_columns: dict[str, Any] = field(default_factory=dict)
    probe_seconds: float = 0.0

    def table(self, cell_key: str) -> pa.Table:
        """The part as a samples table (the cell's samples schema) with its counters in the
        schema metadata: one file, written atomically, holds all of it."""
        out = self.outcome
        meta = {
            "index": self.index,
            "count": self.count,
            "versions": self.versions,
            "gradient_calls": out.gradient_calls,
            "queries": out.queries,
            "seconds": out.seconds,
            "clean_loss": out.clean_loss,
            "adv_loss": out.adv_loss,
            "transfer_seconds": self.transfer_seconds,
            "transfer_used": self.transfer_used,
            "transfer_generated": self.transfer_generated,
            "provenance": self.provenance,
            "cell_columns": self.cell_columns,
            "probe_seconds": self.probe_seconds,
            "samples": self.indices.tolist(),  # the shard's order, which the samples table does not keep
        }
        schema = SAMPLE_SCHEMA.with_metadata({**SAMPLE_SCHEMA.metadata, PART_METADATA: json.dumps(meta).encode()})
        return pa.Table.from_pydict(sample_rows(cell_key, self.indices, out), schema=schema)

    @classmethod
    def from_table(cls, table: pa.Table) -> Part:
        """The part stored as ``table`` (see :meth:`table`)."""
        meta = json.loads(table.schema.metadata[PART_METADATA])
        indices = torch.tensor(meta["samples"], dtype=torch.int64)
        outcome = _outcome(indices, table.to_pydict(), len(meta["versions"]))
        outcome.gradient_calls, outcome.queries = meta["gradient_calls"], meta["queries"]
        outcome.seconds, outcome.clean_loss, outcome.adv_loss = meta["seconds"], meta["clean_loss"], meta["adv_loss"]
        return cls(
            index=meta["index"],
            count=meta["count"],
            indices=indices,
            outcome=outcome,
            versions=list(meta["versions"]),
            transfer_seconds=meta["transfer_seconds"],
            transfer_used=list(meta["transfer_used"]),
            transfer_generated=meta["transfer_generated"],
            provenance=dict(meta["provenance"]),
            cell_columns=dict(meta["cell_columns"]),
            probe_seconds=meta["probe_seconds"],
        )


def _outcome(indices: Tensor, columns: dict[str, list[Any]], n_versions: int) -> Outcome:
    """The outcome whose :func:`~robench.execute.rows.sample_rows` are ``columns`` (the inverse of that function:
    a version that did not run on a sample leaves it not fooled, as the engine does)."""
    position = {int(s): i for i, s in enumerate(indices.tolist())}
    n = len(indices)
    clean = torch.zeros(n, dtype=torch.bool)
    versions = [torch.ones(n, dtype=torch.bool) for _ in range(n_versions)]
    attacked = [torch.zeros(n, dtype=torch.bool) for _ in range(n_versions)]
    for sample, version, correct in zip(columns["sample"], columns["version"], columns["correct"], strict=True):
        i = position[int(sample)]
        if version < 0:
            clean[i] = bool(correct)
        else:
            versions[version][i] = bool(correct)
            attacked[version][i] = True
    stacked = torch.stack(versions) if versions else torch.zeros(0, dtype=torch.bool)
    return Outcome(clean=clean, versions=versions, attacked=attacked, robust=all_or_nothing(clean, stacked))


def concat(parts: list[Part]) -> Outcome:
    """The cell's outcome: its parts' outcomes in shard order, counters summed."""
    ordered = sorted(parts, key=lambda p: p.index)
    outs = [p.outcome for p in ordered]
    n_versions = len(outs[0].versions)
    return Outcome(
        clean=torch.cat([o.clean for o in outs]),
        versions=[torch.cat([o.versions[v] for o in outs]) for v in range(n_versions)],
        attacked=[torch.cat([o.attacked[v] for o in outs]) for v in range(n_versions)],
        robust=torch.cat([o.robust for o in outs]),
        gradient_calls=sum(o.gradient_calls for o in outs),
        queries=sum(o.queries for o in outs),
        seconds=sum(o.seconds for o in outs),
        clean_loss=sum(o.clean_loss for o in outs),
        adv_loss=sum(o.adv_loss for o in outs),
    )
