"""The ``robustbench`` protocol: RobustBench's leaderboard evaluation of Linf and L2 models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from robench import AttackUse, PluginSpec, Protocol, ProtocolDef


@dataclass(frozen=True, kw_only=True)
class RobustBenchProtocol(ProtocolDef):
    """RobustBench's leaderboard protocol: AutoAttack, standard version, one version, every preset.

    APGD-CE, APGD-T, FAB-T (100 iterations each) and Square (5000 queries), each on the
    samples the previous ones did not fool: RobustBench's ``benchmark()`` (robustbench/eval.py,
    ``AutoAttack(version='standard')``), here with torchattacks' implementation of the four
    attacks. The leaderboard runs it at eps 8/255 (Linf) or 0.5 (L2), the CIFAR defaults
    (``--norm l2`` for L2), on the first n test images in order: ``--sample-order first``.
    A cell that does all of this on a model with published numbers is compared with them
    (``flag_above_reference``). For the leaderboard's corruptions evaluation, use the
    ``corruptions`` protocol (the mean accuracy over the 15 x 5 sets).
    """

    name: ClassVar[str] = "robustbench"

    def build(self, preset: str) -> Protocol:
        """One standard AutoAttack use; the leaderboard's protocol does not shrink for CPUs."""
        use = AttackUse(PluginSpec.of("autoattack", {"steps": 100, "n_queries": 5000}))
        return Protocol(name=self.name, uses=(use,), revision=self.revision)
