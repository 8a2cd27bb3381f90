"""A cell's transfer and corruption sets: read from the shared cache, or produced once.

The engine asks the cell's :class:`TransferSource` for the whole adversarial (or corrupted)
copy of the evaluation subset a version needs. It is generated against the surrogate
(or by the corruption) only if no other target, task or process produced it before, and
under the set's cache lock (:mod:`robench.execute.locks`), so that concurrent tasks wait
for the one producing it instead of producing it again.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Protocol as Interface

import torch
from torch import nn

from robench.cell import Cell
from robench.context import ImageData, Progress
from robench.execute.corruption import corrupted_set
from robench.execute.engine import Setup, generate
from robench.execute.locks import CacheLocks
from robench.execute.rows import data_hash, now
from robench.execute.versions import TransferCache, Version
from robench.protocol import Protocol, Surrogate


class _Cache(Interface):
    @property
    def locks(self) -> CacheLocks: ...


class SetSession(Interface):
    """What a transfer source uses of its session (:class:`robench.execute.session.Session`)."""

    @property
    def progress(self) -> Progress:
        """Progress reporting."""
        ...

    @property
    def cache(self) -> _Cache:
        """The model cache (for its locks)."""
        ...

    @property
    def transfer_cache(self) -> TransferCache:
        """The shared transfer sets."""
        ...

    def surrogate(self, cell: Cell, surrogate: Surrogate) -> tuple[nn.Module, list[str]]:
        """The surrogate ensemble for ``cell`` and the cache names of its members."""
        ...


class TransferSource:
    """Gives a cell the transfer examples of a version: from the shared cache, or generated
    once against the surrogate and stored for every other target."""

    def __init__(
        self, session: SetSession, cell: Cell, protocol: Protocol, setup: Setup, data: ImageData, indices: torch.Tensor
    ) -> None:
        self.session, self.cell, self.protocol = session, cell, protocol
        self.setup, self.data, self.indices = setup, data, indices
        self.seconds = 0.0
        self.used: list[str] = []
        self.generated = 0  # of the sets used, those this cell produced (the rest came from the cache)
        self._surrogates: dict[str, tuple[nn.Module, list[str]]] = {}

    def __call__(self, version: Version) -> torch.Tensor:
        log = self.session.progress.log
        what = f"the set {version.label} at eps={self.cell.eps:g}"
        with self.session.cache.locks.hold(self.set_name(version), what, log):
            return self._produce(version)  # a set another task is producing: waited for, then read

    def set_name(self, version: Version) -> str:
        """The name of ``version``'s set: equal for every cell (target) that uses the same set."""
        source = version.use.source
        corrupted = self.protocol.is_corruption()  # corruption sets have no surrogate
        surrogate = None if source is None or corrupted else dataclasses.asdict(self.protocol.surrogate(source))
        what: list[object] = [self.cell.model.dataset, data_hash(self.indices), version.key()]
        if not corrupted:  # a corruption set is one for every seed and eps
            what += [self.cell.norm, self.cell.eps, self.cell.model.seed, surrogate]
        return json.dumps(what, sort_keys=True, default=str)

    def _produce(self, version: Version) -> torch.Tensor:
        if self.protocol.is_corruption():  # no surrogate: a cached transform of the clean set
            return corrupted_set(self, version)
        start = now()
        assert version.use.source is not None
        surrogate = self.protocol.surrogate(version.use.source)
        if surrogate.name not in self._surrogates:
            self._surrogates[surrogate.name] = self.session.surrogate(self.cell, surrogate)
        model, hashes = self._surrogates[surrogate.name]
        key = {
            "dataset": self.cell.model.dataset,
            "indices": data_hash(self.indices),
            "surrogate": hashes,
            "version": version.key(),
            "norm": self.cell.norm,
            "eps": self.cell.eps,
            "seed": self.cell.model.seed,
        }
        clean = self.data.batch(self.indices)[0]
        x_adv = self.session.transfer_cache.get(key, clean, self.cell.threat)
        if x_adv is None:
            self.session.progress.log(f"generating transfer set {version.label} at eps={self.cell.eps:g}")
            setup = Setup(
                key=json.dumps(key, sort_keys=True),
                batch_size=self.setup.batch_size,
                device=self.setup.device,
                exhaustive=True,
            )
            x_adv = generate(model, version, self.cell.threat, self.data, self.indices, setup)
            self.session.transfer_cache.put(key, x_adv)
            self.generated += 1
        self.used.append(self.session.transfer_cache.name(key))
        self.seconds += (now() - start).total_seconds()
        return x_adv
