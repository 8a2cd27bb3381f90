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

import difflib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, TypedDict

from robench.context import Norm
from robench.errors import ConfigError
from robench.plugin import Plugin, PluginSpec

DEFAULT_EOT = 40
"""Softmax draws averaged per gradient for randomized variants, unless a protocol says otherwise
(``-P eot=N``). From the curve of robust accuracy against draws (``benchmarks/eot_curve.py``,
Fashion-MNIST, 200 images, PGD-20 at eps 0.1): the smallest count in 10/20/40/80 that no larger
one lowered significantly (paired, one-sided p < 0.05) for either model. EIO's ``rgn`` settles
by 10 (25.0 / 22.5 / 23.0 / 27.5 %); the ``trap-noise`` trap needs 40 (22.5 / 22.5 / 19.0 /
14.5 %: 10 and 20 against 80, p = 0.01; 40 against 80, p = 0.09). Models noisier still are what
the per-cell EOT probe (robench/execute/eotcheck.py) is for."""

DEFAULT_VOTES = 5
"""Resampled predictions per verdict for randomized variants (a majority decides)."""

SETTINGS = ("eot", "votes")
"""The parameters every protocol takes, the one-attack ones of ``--attack`` included."""


class Settings(TypedDict, total=False):
    """Protocol settings given by the user (those absent keep the protocol's own)."""

    eot: int
    votes: int


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
    eot: int = DEFAULT_EOT
    votes: int = DEFAULT_VOTES
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
    """Base class for protocol plugins: fields are parameters, :meth:`build` the protocol.

    Every protocol also takes ``eot`` and ``votes`` (how randomized variants are attacked and
    judged); ``None`` keeps what :meth:`build` chose (by default :data:`DEFAULT_EOT` and
    :data:`DEFAULT_VOTES`). :meth:`resolve` applies them.
    """

    kind: ClassVar[str] = "protocol"
    revision: ClassVar[int] = 1
    eot: int | None = None
    votes: int | None = None

    @abstractmethod
    def build(self, preset: str) -> Protocol:
        """The concrete protocol for a preset (``smoke`` or ``paper``)."""

    @classmethod
    def describe(cls) -> str:
        """The plugin's description, and what every protocol's ``eot`` and ``votes`` mean."""
        return (
            f"{super().describe()}\n\neot, votes (every protocol): randomized variants are attacked through the mean "
            f"of eot softmax draws and judged by a majority of votes predictions (None: the protocol's own, by "
            f"default {DEFAULT_EOT} and {DEFAULT_VOTES})"
        )

    def resolve(self, preset: str) -> Protocol:
        """:meth:`build`'s protocol with the ``eot`` and ``votes`` given, checked."""
        return replace(self.build(preset), **self.settings())

    def settings(self) -> Settings:
        """The ``eot`` and ``votes`` given (not ``None``), checked."""
        given = {k: v for k, v in (("eot", self.eot), ("votes", self.votes)) if v is not None}
        return check_settings(given, f"protocol {self.name!r}")


def check_settings(settings: Mapping[str, Any], where: str) -> Settings:
    """``settings`` if they are known protocol settings (:data:`SETTINGS`) with valid values.

    :raises ConfigError: an unknown key (with the nearest known one) or a bad value
    """
    for key, value in settings.items():
        if key not in SETTINGS:
            close = difflib.get_close_matches(key, SETTINGS, n=1)
            hint = f" Did you mean: {close[0]}?" if close else ""
            raise ConfigError(
                f"{where} got unknown parameter {key!r}.{hint} A one-attack protocol (--attack) takes only "
                f"{', '.join(SETTINGS)}; give the attack's own parameters with -A (in a file: [attacks.NAME])"
            )
        low = 0 if key == "eot" else 1  # eot 0: attack one draw (the row is flagged); a verdict needs a vote
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{where}: {key} must be an integer >= {low}, got {value!r}")
    checked = Settings()
    if "eot" in settings:
        checked["eot"] = settings["eot"]
    if "votes" in settings:
        checked["votes"] = settings["votes"]
    return checked


def single_attack(spec: PluginSpec, settings: Mapping[str, Any] | None = None) -> Protocol:
    """The white-box protocol of one attack with its own restarts: what ``--attack`` means.

    :param settings: its ``eot`` and ``votes`` (``-P eot=40``), checked
    """
    checked = check_settings(settings or {}, f"protocol {spec.label()!r} (--attack {spec.name})")
    return Protocol(name=spec.label(), uses=(AttackUse(spec),), **checked)


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
    settings = check_settings({k: data[k] for k in SETTINGS if k in data}, f"protocol {name!r}")
    return Protocol(name=name, uses=uses, surrogates=surrogates, **settings)
