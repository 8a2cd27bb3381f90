"""Evaluation protocols: named, documented, versioned sets of attack versions.

A protocol lists *uses* of attacks. A use is white-box (attacks the evaluated model itself)
or transfer (attacks a held-out surrogate; the adversarial examples are generated once and
reused by every target). Each use contributes ``attack.n_versions()`` versions (random
restarts); a sample is robust only if it survives every version of every use.

Protocols arrive like every other plugin: classes returned by ``robench_protocols`` whose
fields are their parameters and whose :meth:`ProtocolDef.build` gives the concrete
:class:`Protocol` for a preset. ``--attack NAME`` on the command line is the one-use
white-box protocol of that attack (:func:`single_attack`).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from robench.context import Norm
from robench.plugin import Plugin, PluginSpec

CLEAN_SOURCE = "clean"
"""The source of the uses of a ``corruption`` protocol: each use is a fixed transform of the
clean test images (no model), cached like a transfer set (robench/execute/corruption.py)."""


@dataclass(frozen=True)
class Surrogate:
    """A held-out source model for transfer attacks: a defense trained with each of
    ``seeds`` and ensembled (the log of the mean softmax, as in DVERGE).

    :param name: how versions refer to it, e.g. ``baseline3``
    :param defense: the defense that builds each member (any registered defense)
    :param seeds: one member per seed; keep them disjoint from the targets' seeds
    :param arch: the members' architecture; ``None`` means the evaluated cell's
    """

    name: str
    defense: PluginSpec = field(default_factory=lambda: PluginSpec("baseline"))
    seeds: tuple[int, ...] = (1000,)
    arch: str | None = None


@dataclass(frozen=True)
class AttackUse:
    """One attack in a protocol, white-box (``source=None``) or from a surrogate."""

    attack: PluginSpec
    source: str | None = None

    def label(self) -> str:
        """Readable name of the use, e.g. ``mifgsm[loss=cw]@baseline3``."""
        return self.attack.label() + (f"@{self.source}" if self.source else "")


@dataclass(frozen=True)
class Protocol:
    """A concrete protocol: its uses, surrogates and how randomized models are judged.

    :param eot: for variants whose prediction is randomized, gradient attacks differentiate
        the mean of ``eot`` softmax draws (expectation over transformation); 0 disables
        it (and the row is flagged)
    :param votes: for randomized variants a sample counts as fooled only when a majority
        of ``votes`` resampled predictions are wrong
    :param norm: the threat the protocol fixes whatever the benchmark's ``norm``; only
        ``corruption`` (cells at eps 0, every use from :data:`CLEAN_SOURCE`), ``None`` for
        perturbation protocols
    """

    name: str
    uses: tuple[AttackUse, ...]
    surrogates: tuple[Surrogate, ...] = ()
    revision: int = 1
    eot: int = 10
    votes: int = 5
    norm: Norm | None = None

    def surrogate(self, name: str) -> Surrogate:
        """The surrogate called ``name``."""
        for surrogate in self.surrogates:
            if surrogate.name == name:
                return surrogate
        raise KeyError(name)

    def canonical(self) -> str:
        """Canonical JSON: part of cell keys and result rows."""
        data = asdict(self)
        if self.norm is None:  # keeps the keys (and stored results) of perturbation protocols
            del data["norm"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)

    def is_transfer(self) -> bool:
        """Whether any use attacks a surrogate (a corruption protocol attacks nothing)."""
        return self.norm != "corruption" and any(use.source for use in self.uses)

    def is_corruption(self) -> bool:
        """Whether this is a common-corruption protocol (no attack; scored on corrupted copies)."""
        return self.norm == "corruption"


@dataclass(frozen=True, kw_only=True)
class ProtocolDef(Plugin, ABC):
    """Base class for protocol plugins: fields are parameters, :meth:`build` the protocol."""

    kind: ClassVar[str] = "protocol"
    revision: ClassVar[int] = 1

    @abstractmethod
    def build(self, preset: str) -> Protocol:
        """The concrete protocol for a preset (``smoke`` or ``paper``)."""


def single_attack(spec: PluginSpec) -> Protocol:
    """The white-box protocol of one attack with its own restarts: what ``--attack`` means."""
    return Protocol(name=spec.label(), uses=(AttackUse(spec),))


def protocol_from_dict(name: str, data: dict[str, Any]) -> Protocol:
    """A protocol declared in a benchmark file::

    [protocols.my-transfer]
    surrogates = [{ name = "base3", defense = "baseline", seeds = [100, 101, 102] }]
    uses = [{ attack = "mifgsm", params = { loss = "cw" }, source = "base3" },
            { attack = "pgd", params = { steps = 50 } }]
    """
    surrogates = tuple(
        Surrogate(
            name=s["name"],
            defense=PluginSpec.of(s.get("defense", "baseline"), s.get("params")),
            seeds=tuple(s.get("seeds", (1000,))),
            arch=s.get("arch"),
        )
        for s in data.get("surrogates", ())
    )
    uses = tuple(AttackUse(PluginSpec.of(u["attack"], u.get("params")), u.get("source")) for u in data["uses"])
    return Protocol(name=name, uses=uses, surrogates=surrogates, eot=data.get("eot", 10), votes=data.get("votes", 5))
