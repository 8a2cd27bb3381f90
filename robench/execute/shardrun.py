"""One shard of a cell, evaluated on its own (:mod:`robench.execute.shards` says what a shard is).

The shard gets a fresh variant (its random stream restarted, its declared preprocessing
crossed by BPDA), the versions its cell's checks left, and its cell's transfer sets sliced
to its samples. Shard 0 also measures the cell's indicators of attack failure on the cell's
check samples, and the EOT probe on its own samples, once per cell, whichever executor runs
the shards.
"""

from __future__ import annotations

import os
import socket
from typing import Protocol as Interface

from torch import nn

import robench
from robench.bpda import with_preprocess
from robench.cell import Cell, ModelKey
from robench.execute.engine import evaluate
from robench.execute.eotcheck import eot_check, eot_columns
from robench.execute.events import Prepared
from robench.execute.indicators import CheckSamples, TransferRows, measure_indicators, path_recorder
from robench.execute.modelcheck import CHECK_SAMPLES, as_evaluated
from robench.execute.prepare import Session as CellSession
from robench.execute.rows import now
from robench.execute.shards import Part
from robench.execute.transfersource import SetSession, TransferSource
from robench.execute.versions import Version
from robench.protocol import Surrogate


class Session(CellSession, SetSession, Interface):
    """What a shard uses of its :class:`~robench.execute.session.Session`: what a cell's
    preparation uses, and more."""

    def shards(self, cell: Cell) -> list[slice]:
        """The cell's shards."""
        ...

    def models(self, key: ModelKey) -> tuple[dict[str, nn.Module], float, str]:
        """Build (or load) a model."""
        ...

    def defense(self, key: ModelKey) -> robench.Defense:
        """The resolved defense of a model key."""
        ...

    def versions(self, cell: Cell, prepared: Prepared) -> list[Version]:
        """The versions the cell's shards run."""
        ...

    def surrogate(self, cell: Cell, surrogate: Surrogate) -> tuple[nn.Module, list[str]]:
        """A surrogate ensemble."""
        ...


def evaluate_shard(session: Session, cell: Cell, prepared: Prepared, index: int) -> Part:
    """Evaluate shard ``index`` of ``cell`` on its own: a fresh variant, its transfer sets
    sliced to the shard (the caller seeds torch's global generators for the shard)."""
    started, waited = now(), session.cache.locks.waited
    data = session.data(cell.model.dataset, "test")
    indices = session.eval_indices(cell.model.dataset)
    slices = session.shards(cell)
    part = slices[index]
    models, _, _ = session.models(cell.model)
    defense = session.defense(cell.model)
    setup = session.setup(cell)
    count = f" shard {index + 1}/{len(slices)}" if len(slices) > 1 else ""
    session.progress.log(f"evaluating {cell.id}{count} ({part.stop - part.start} samples)")
    declared = with_preprocess(defense.variant(cell.variant, models[cell.variant]))  # BPDA, if declared
    variant = as_evaluated(declared, prepared.checks)
    versions = session.versions(cell, prepared)
    transfer = TransferSource(session, cell, prepared.protocol, setup, data, indices)
    # shard 0 measures the cell's indicators on its check samples (the first of the subset):
    # it keeps their transfer examples and records its attack's path on them
    check, recorder = None, None
    kept: TransferSource | TransferRows = transfer
    if index == 0:
        n = min(CHECK_SAMPLES, part.stop)
        x, y = data.batch(indices[:n])
        check = CheckSamples(setup.place(x), y.to(setup.device), indices[:n])
        recorder = path_recorder(versions, cell.threat, check, data, indices[part], setup.batch_size)
        kept = TransferRows(transfer, n)
    out = evaluate(
        variant,
        versions,
        cell.threat,
        data,
        indices[part],
        setup=setup,
        transfer=lambda version: kept(version)[part],
        progress=session.progress,
        recorder=recorder,
    )
    cell_columns: dict[str, object] = {}
    probe_seconds = 0.0
    if check is not None and isinstance(kept, TransferRows):
        protocol = prepared.protocol

        def surrogate(name: str) -> nn.Module:
            return session.surrogate(cell, protocol.surrogate(name))[0]

        found = measure_indicators(
            variant, versions, cell.threat, check, setup, prepared.checks, out, recorder, kept.rows, surrogate
        )
        # the EOT probe (randomized variants) reruns the first white-box version at half the draws
        eot = eot_check(variant, versions, out, cell.threat, data, indices[part], setup)
        cell_columns = {**found.columns(), **eot_columns(eot)}
        probe_seconds = 0.0 if eot is None else eot.seconds
    provenance = {
        "device": str(session.device),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": started.timestamp(),
        "finished": now().timestamp(),
        "lock_wait_seconds": session.cache.locks.waited - waited,
    }
    return Part(
        index=index,
        count=len(slices),
        indices=indices[part],
        outcome=out,
        versions=[v.label for v in versions],
        transfer_seconds=transfer.seconds,
        transfer_used=transfer.used,
        transfer_generated=transfer.generated,
        provenance=provenance,
        cell_columns=cell_columns,
        probe_seconds=probe_seconds,
    )
