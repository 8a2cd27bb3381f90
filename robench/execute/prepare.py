"""A cell's preparation, once per cell before its shards: the model checks on its first
samples (:mod:`robench.execute.modelcheck`) and the row facts that do not depend on the
samples (efficiency, randomness, the files it came from).

Every shard uses this one verdict (and the versions the checks add), whichever device or
worker runs it, so the checks run once per cell, not once per shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol as Interface

import torch

import robench
from robench.bpda import bpda_column, with_preprocess
from robench.cell import Cell
from robench.context import ImageData, Progress
from robench.discover.registry import Registries
from robench.execute.corruption import without_gradient_checks
from robench.execute.efficiency import measure
from robench.execute.engine import Setup, deterministic
from robench.execute.events import Prepared
from robench.execute.modelcheck import CHECK_SAMPLES, ModelChecks, as_evaluated, check_model
from robench.execute.rows import now
from robench.protocol import Protocol


class Session(Interface):
    """What a cell's preparation uses of its :class:`~robench.execute.session.Session`."""

    @property
    def registries(self) -> Registries:
        """The plugin registries."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the checks run."""
        ...

    @property
    def progress(self) -> Progress:
        """Progress reporting."""
        ...

    def data(self, dataset: str, split: str) -> ImageData:
        """A loaded split."""
        ...

    def eval_indices(self, dataset: str) -> torch.Tensor:
        """The evaluation subset."""
        ...

    def setup(self, cell: Cell) -> Setup:
        """How the cell's versions run."""
        ...

    def masking_protocol(self, cell: Cell, checks: ModelChecks) -> Protocol:
        """The cell's protocol with the masking versions."""
        ...


def prepare_cell(
    session: Session, cell: Cell, make_variant: Callable[[], robench.Variant], build_seconds: float, model_hash: str
) -> Prepared:
    """The model checks of ``cell`` and what its shards share (run under the cell's seed)."""
    started = now()
    data = session.data(cell.model.dataset, "test")
    indices = session.eval_indices(cell.model.dataset)
    p = cell.protocol
    setup = session.setup(cell)
    declared, checks = _check(session, cell, make_variant, data, indices, setup)
    checks = without_gradient_checks(checks, p)
    variant = as_evaluated(declared, checks)
    eff = measure(
        declared.model,
        data.batch(indices[:1])[0].to(session.device),
        bits=declared.bits,
        counted=declared.attack_model,
        model_bytes=declared.model_bytes,
    )
    facts = {
        "exhaustive": setup.exhaustive,
        "randomized": variant.randomized,
        "quantized_engine": variant.quantized_engine,
        "weights_sha256": declared.weights_sha256,
        "variant_config": declared.config,
        "bpda": bpda_column(declared),
        "eot": p.eot if variant.randomized else 0,
        "votes": p.votes if variant.randomized else 1,
        **dataclasses.asdict(eff),
    }
    protocol = session.masking_protocol(cell, checks) if checks.vanishing else p
    return Prepared(
        checks, protocol, declared.randomized, facts, build_seconds, model_hash, started, reference=declared.reference
    )


def _check(
    session: Session,
    cell: Cell,
    make_variant: Callable[[], robench.Variant],
    data: ImageData,
    indices: torch.Tensor,
    setup: Setup,
) -> tuple[robench.Variant, ModelChecks]:
    """The declared variant and the model checks on the first of the cell's samples."""
    variant = with_preprocess(make_variant())  # a declared preprocess: predicted through, attacked by BPDA
    x, y = data.batch(indices[:CHECK_SAMPLES])
    placed = dataclasses.replace(
        variant,
        model=setup.place_model(variant.model),
        grad_model=None if variant.grad_model is None else setup.place_model(variant.grad_model),
    )
    num_classes = session.registries.datasets.get(cell.model.dataset).shape.num_classes
    with deterministic(setup.device):  # as the attacks run: on CUDA, repeats must not differ by kernel choice
        checks = check_model(placed, setup.place(x), y.to(setup.device), num_classes)
    if checks.fired(variant.randomized) or checks.training_modules:
        session.progress.log(f"checks {cell.id}: {checks.describe(variant.randomized)}")
    return variant, checks
