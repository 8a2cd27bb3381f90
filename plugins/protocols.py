"""The built-in evaluation protocols (METHODS.md §1; DESIGN.md §2 "protocol").

Each protocol is versioned by ``revision``: change it whenever a change would move numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import robench
from robench import DEFAULT_EOT, AttackUse, ConfigError, PluginSpec, Protocol, ProtocolDef, Surrogate


@dataclass(frozen=True, kw_only=True)
class WhiteboxPGD(ProtocolDef):
    """EIO/DVERGE white-box protocol: PGD-50, step eps/5, 5 random starts, all-or-nothing (EIO App. A.1).

    Args:
        steps: PGD steps.
        restarts: random starts, each a version.
        loss: ``ce`` or ``cw`` (DVERGE's CW margin, confidence 0.1).
    """

    name: ClassVar[str] = "whitebox-pgd"
    steps: int = 50
    restarts: int = 5
    loss: str = "ce"

    def build(self, preset: str) -> Protocol:
        """The same protocol for every preset: it is cheap enough for CPUs."""
        pgd = PluginSpec.of(
            "pgd", {"steps": self.steps, "step_size": 0.2, "restarts": self.restarts, "loss": self.loss}
        )
        return Protocol(name=self.name, uses=(AttackUse(pgd),), revision=self.revision)


@dataclass(frozen=True, kw_only=True)
class BlackboxDverge(ProtocolDef):
    """DVERGE black-box protocol: 30 transfer versions from held-out baseline ensembles (METHODS.md §1.2).

    Per surrogate ensemble and per loss (cross-entropy, CW margin): momentum PGD with 3
    random starts, M-DI2-FGSM (p=0.5) and SGM (gamma=0.2), all ``steps`` iterations of
    eps/5. The paper preset uses ensembles of 3, 5 and 8 baseline ResNet-20 (3 x 2 x 5 =
    30 versions); the smoke preset uses ensembles of 1 and 2, 10 steps, and surrogates
    trained on a 10k-image subset for one epoch.

    Args:
        groups: ensemble sizes; each is one surrogate of that many baseline members.
        steps: iterations of every attack (0 = the preset's: 100 paper, 10 smoke).
        surrogate_arch: the members' architecture; SGM needs a residual one.
        first_seed: member seeds start here (held out from the targets' seeds).
    """

    name: ClassVar[str] = "blackbox-dverge"
    groups: tuple[int, ...] = ()
    steps: int = 0
    surrogate_arch: str = "resnet20"
    first_seed: int = 1000

    def build(self, preset: str) -> Protocol:
        """Surrogates and the 10 versions per surrogate."""
        paper = preset == "paper"
        groups = self.groups or ((3, 5, 8) if paper else (1, 2))
        steps = self.steps or (100 if paper else 10)
        member = PluginSpec.of("baseline", {} if paper else {"train_subset": 10000, "epochs": 1})
        surrogates, uses = [], []
        for g, size in enumerate(groups):
            name = f"baseline{size}"
            seeds = tuple(self.first_seed + 100 * g + i for i in range(size))
            surrogates.append(Surrogate(name, member, seeds, self.surrogate_arch))
            for loss in ("ce", "cw"):
                common = {"steps": steps, "step_size": 0.2, "loss": loss}
                uses += [
                    AttackUse(PluginSpec.of("mifgsm", {**common, "restarts": 3}), name),
                    AttackUse(PluginSpec.of("mdi2fgsm", {**common, "prob": 0.5}), name),
                    AttackUse(PluginSpec.of("sgm", {**common, "gamma": 0.2}), name),
                ]
        return Protocol(name=self.name, uses=tuple(uses), surrogates=tuple(surrogates), revision=self.revision)


@dataclass(frozen=True, kw_only=True)
class AdvftPGD(ProtocolDef):
    """Adver-Fine's PGD: 20 steps of eps/10, no random start (0.005 at the paper's pixel eps 0.05).

    The paper applies eps 0.1 and step 0.01 after Normalize(0.5, 0.5), i.e. 0.05 and 0.005
    in pixels (METHODS.md §3.3); run it with ``--eps 0.05`` to match. Unlike the paper's
    code, robench clamps adversarial images to [0, 1].

    As in the paper, the last iterate is scored (revision 2; revision 1 froze a sample at
    its first adversarial iterate). For int8 variants this matters: the attack sees the
    fake-quant twin, and a sample frozen where the twin is barely fooled can still be
    classified correctly by the integer model (measured: Q(f_std)+SFT 6.3 % robust frozen,
    3.8 % at the last iterate).
    """

    name: ClassVar[str] = "advft-pgd"
    revision: ClassVar[int] = 2

    def build(self, preset: str) -> Protocol:
        """One deterministic PGD version, scored at its last iterate."""
        pgd = PluginSpec.of("pgd", {"steps": 20, "step_size": 0.1, "random_start": False, "stop_on_success": False})
        return Protocol(name=self.name, uses=(AttackUse(pgd),), revision=self.revision)


@dataclass(frozen=True, kw_only=True)
class EOTPGDProtocol(ProtocolDef):
    """PGD with expectation over transformation (EOT-PGD, 50 steps, 5 restarts) for randomized models.

    The attack averages its own gradient draws, so here ``eot`` (like ``eot_iter``) sets the
    attack's draws per step and the runner adds no expectation of its own.

    Args:
        eot_iter: gradient samples averaged per step (``eot`` is the same setting).
    """

    name: ClassVar[str] = "eot-pgd"
    eot_iter: int = DEFAULT_EOT

    def build(self, preset: str) -> Protocol:
        """One EOT-PGD use with its restarts."""
        draws = self.eot_iter if self.eot is None else self.eot
        if self.eot is not None and self.eot_iter not in (DEFAULT_EOT, self.eot):
            raise ConfigError(f"protocol 'eot-pgd': eot={self.eot} and eot_iter={self.eot_iter} disagree; give one")
        attack = PluginSpec.of("eot-pgd", {"steps": 50, "step_size": 0.2, "restarts": 5, "eot_iter": draws})
        # eot=1: the attack averages gradients itself; the runner's expectation model would
        # multiply the draws
        return Protocol(name=self.name, uses=(AttackUse(attack),), revision=self.revision, eot=1)

    def resolve(self, preset: str) -> Protocol:
        """:meth:`build`'s protocol (which applies ``eot``) with the ``votes`` given."""
        settings = self.settings()
        settings.pop("eot", None)
        return replace(self.build(preset), **settings)


@dataclass(frozen=True, kw_only=True)
class AutoAttackProtocol(ProtocolDef):
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square; torchattacks' implementation)."""

    name: ClassVar[str] = "autoattack"

    def build(self, preset: str) -> Protocol:
        """One AutoAttack use."""
        return Protocol(name=self.name, uses=(AttackUse(PluginSpec.of("autoattack")),), revision=self.revision)


@dataclass(frozen=True, kw_only=True)
class SquareProtocol(ProtocolDef):
    """Square attack: query-based, no gradients, for defenses whose gradients are suspect.

    Args:
        n_queries: query budget per sample (0 = the preset's: 5000 paper, 1000 smoke).
    """

    name: ClassVar[str] = "square"
    n_queries: int = 0

    def build(self, preset: str) -> Protocol:
        """One Square use."""
        queries = self.n_queries or (5000 if preset == "paper" else 1000)
        use = AttackUse(PluginSpec.of("square", {"n_queries": queries}))
        return Protocol(name=self.name, uses=(use,), revision=self.revision)


@robench.hookimpl
def robench_protocols() -> list[type[ProtocolDef]]:
    """The built-in protocols."""
    return [AdvftPGD, AutoAttackProtocol, BlackboxDverge, EOTPGDProtocol, SquareProtocol, WhiteboxPGD]
