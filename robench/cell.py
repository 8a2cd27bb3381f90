"""A cell and the key of the model it evaluates: what the planner makes, the runner runs, and
hooks receive (``robench_cell_start`` / ``robench_cell_finish``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from robench.context import Norm, Threat
from robench.protocol import Protocol


@dataclass(frozen=True)
class ModelKey:
    """What determines a built model: built once per key, cached by its hash."""

    dataset: str
    arch: str
    defense: str
    defense_params: str  # canonical JSON of the resolved parameters (preset + user)
    defense_label: str  # readable: name plus the user's parameters
    seed: int
    preset: str
    revision: int = 1  # Defense.model_revision(): bumped when the defense's models would change
    network: str = ""  # Defense.network(arch) when it is not ``arch`` (a zoo model's own); not in the digest

    @property
    def evaluated_arch(self) -> str:
        """The network the cells evaluate, for ids and the ``arch`` column: ``arch``, unless the
        defense brings its own (``network``, e.g. a RobustBench WideResNet-28-10)."""
        return self.network or self.arch

    def digest(self) -> str:
        """Content hash of the key (the model cache's directory name)."""
        fields: list[object] = [self.dataset, self.arch, self.defense, self.defense_params, self.seed]
        if self.revision != 1:  # so that keys (and cached models) of revision-1 defenses never moved
            fields.append(self.revision)
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    """One evaluation: a model variant under one attack protocol at one eps."""

    model: ModelKey
    variant: str
    protocol: Protocol
    norm: Norm
    eps: float
    n_samples: int
    sample_seed: int
    sample_order: str = "random"  # robench.plan.config.SAMPLE_ORDERS

    @property
    def id(self) -> str:
        """Stable, readable id, e.g. ``fashion-mnist/cnn8/advt/model/pgd/linf/eps=0.1/seed=0``."""
        m = self.model
        return (
            f"{m.dataset}/{m.evaluated_arch}/{m.defense_label}/{self.variant}/{self.protocol.name}/"
            f"{self.norm}/eps={self.eps:g}/seed={m.seed}"
        )

    @property
    def key(self) -> str:
        """Content hash of everything that determines the cell's numbers (file names)."""
        fields = [
            self.model.digest(),
            self.variant,
            self.protocol.canonical(),
            self.norm,
            self.eps,
            self.n_samples,
            self.sample_seed,
        ]
        if self.sample_order != "random":  # keys of random-order cells (every earlier run's) stay as they were
            fields.append(self.sample_order)
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]

    @property
    def threat(self) -> Threat:
        """The cell's threat model."""
        return Threat(self.norm, self.eps)
