"""A finished cell's row and samples, assembled from its prepared facts and all of its parts.

The driver assembles a cell when its last shard is stored (:mod:`robench.execute.shards`),
whichever executor computed the shards: the row is the one an unsharded evaluation gives,
with the shards' outcomes concatenated in order and their counters summed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from robench.cell import Cell
from robench.execute.corruption import corruption_columns
from robench.execute.events import Prepared
from robench.execute.modelcheck import check_columns
from robench.execute.rows import now, sample_rows, scores
from robench.execute.shards import Part, concat
from robench.execute.versions import Version
from robench.results.reference import reference_columns
from robench.results.storage import CellResult


class PartsMismatch(ValueError):
    """Stored parts that do not fit the cell as prepared now (other versions or samples)."""


@dataclass(frozen=True)
class RowInputs:
    """What a cell's row is made of.

    :param cell: the cell
    :param prepared: its model checks and facts
    :param parts: every one of its shards' parts
    :param versions: the versions the shards ran (the protocol's, then any the checks added)
    :param own: how many of ``versions`` are the protocol's own
    :param batch_size: the attack batch size the shards used
    :param shard_size: the shard size they were cut with
    """

    cell: Cell
    prepared: Prepared
    parts: list[Part]
    versions: list[Version]
    own: int
    batch_size: int
    shard_size: int


def assemble_row(inputs: RowInputs, key_columns: dict[str, Any], indices: torch.Tensor) -> CellResult:
    """The ``ok`` row and samples of a cell whose parts are all in.

    :raises PartsMismatch: if the parts do not cover ``indices`` in order with the
        prepared versions (parts stored by another robench, or for another subset)
    """
    parts = sorted(inputs.parts, key=lambda p: p.index)
    labels = [v.label for v in inputs.versions]
    covered = torch.cat([p.indices for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
    stale = [p.index for p in parts if p.versions != labels]
    if stale or not torch.equal(covered, indices):
        raise PartsMismatch(
            f"parts {stale or [p.index for p in parts]} of cell {inputs.cell.id} do not match its versions "
            "or samples as prepared now"
        )
    out = concat(parts)
    prepared, checks = inputs.prepared, inputs.prepared.checks
    added = inputs.versions[inputs.own :] if checks.vanishing else []
    measured = scores(out, len(indices))
    row = {
        **key_columns,
        **measured,
        **reference_columns(inputs.cell, prepared.reference, measured["robust_ci_low"]),
        **check_columns(checks, prepared.declared_randomized, out, added),
        **corruption_columns(inputs.cell.protocol, inputs.versions, out),
        **prepared.facts,
        **parts[0].cell_columns,  # per cell (indicators, EOT probe): measured with shard 0
        "skipped_versions": json.dumps([v.label for v in inputs.versions if v.skipped]),
        "status": "ok",
        "error": "",
        "n_versions": len(inputs.versions),
        "batch_size": inputs.batch_size,
        "shard_size": inputs.shard_size,
        "shards": len(parts),
        "build_seconds": prepared.build_seconds,
        "attack_seconds": out.seconds,
        "transfer_seconds": sum(p.transfer_seconds for p in parts),
        "gradient_calls": out.gradient_calls,
        "queries": out.queries,
        "versions": json.dumps(labels),
        "transfer_sets": json.dumps(list(dict.fromkeys(name for p in parts for name in p.transfer_used))),
        "transfer_generated": sum(p.transfer_generated for p in parts),
        "model_hash": prepared.model_hash,
        "started_at": prepared.started_at,
        "finished_at": now(),
    }
    row["check_seconds"] += parts[0].probe_seconds  # the EOT probe is a check too
    return CellResult(row, sample_rows(inputs.cell.key, indices, out))
