"""Did a randomized variant's EOT converge? Robust accuracy at half the draws against all of them.

Expectation over transformation (Athalye et al. 2018) estimates the gradient of a random
model from ``eot`` draws. Too few draws leave the estimate noisy, the attack weaker and the
robust accuracy too high; how many are enough depends on the model, so a fixed default can
be too low. The probe reruns the cell's first white-box version with half the draws, on the
samples that version attacked, with the same per-sample keys (the same random starts), and
compares the verdicts sample by sample with the cell's own run. If doubling the draws
lowered the accuracy significantly (an exact one-sided McNemar test on the samples whose
verdict changed), doubling them again would likely lower it further: the row gets
``flag_eot_not_converged`` and the remedy is a larger ``-P eot``.

The probe costs about half of that one version. It runs for randomized variants only, and
only when the cell has a white-box version with at least 2 draws: the runner's expectation
(``eot``), or draws the attack averages itself (an ``eot_iter`` parameter, as ``eot-pgd``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from robench.context import ImageData, Threat
from robench.defense import Variant
from robench.execute.engine import Judge, Outcome, Setup, _whitebox, deterministic
from robench.execute.versions import ExpectationModel, Version

ALPHA = 0.05
"""Significance of "doubling the draws lowered the accuracy" that raises the flag."""

EOT_COLUMNS = ("eot_half", "eot_half_acc", "eot_full_acc", "eot_p", "flag_eot_not_converged")
"""The probe's columns of the cells table (documented in robench/results/storage.py); its time
counts in ``check_seconds``."""


@dataclass(frozen=True)
class EotCheck:
    """The probe's outcome on one cell.

    :param half: draws of the probe (half the cell's)
    :param half_acc: robust accuracy under the probed version with ``half`` draws
    :param full_acc: the same with every draw (the cell's own run of that version)
    :param lowered: samples robust with half the draws and fooled with all of them
    :param raised: samples fooled with half the draws and robust with all of them
    """

    half: int
    half_acc: float
    full_acc: float
    lowered: int
    raised: int
    seconds: float

    @property
    def p(self) -> float:
        """One-sided exact McNemar p-value that more draws lower the accuracy."""
        return binomial_tail(self.lowered, self.lowered + self.raised)

    @property
    def not_converged(self) -> bool:
        """Whether more draws would likely lower the accuracy further."""
        return self.lowered > self.raised and self.p < ALPHA


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2); 1 when ``n`` is 0."""
    if n == 0:
        return 1.0
    return float(sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n)


def eot_check(
    variant: Variant,
    versions: list[Version],
    out: Outcome,
    threat: Threat,
    data: ImageData,
    indices: Tensor,
    setup: Setup,
) -> EotCheck | None:
    """Probe the cell's first white-box version at half its draws; ``None`` where no probe applies."""
    probe = _probe(variant, versions, setup)
    if probe is None:
        return None
    version, grad_model, half = probe
    start = time.perf_counter()
    full = out.clean & out.versions[version.index]
    active = out.clean & out.attacked[version.index]  # the samples the cell's run attacked with it
    judge = Judge(setup.place_model(variant.model), setup.votes)
    with deterministic(setup.device):
        correct, _ = _whitebox(judge, grad_model, version, threat, data, indices, active, setup)
    half_robust = out.clean & correct
    n = max(len(indices), 1)
    return EotCheck(
        half=half,
        half_acc=float(half_robust.sum()) / n,
        full_acc=float(full.sum()) / n,
        lowered=int((half_robust & ~full).sum()),
        raised=int((~half_robust & full).sum()),
        seconds=time.perf_counter() - start,
    )


def _probe(variant: Variant, versions: list[Version], setup: Setup) -> tuple[Version, nn.Module, int] | None:
    """The version to probe, the model it attacks with half the draws, and that number of draws."""
    if not variant.randomized:
        return None
    version = next((v for v in versions if v.use.source is None and not v.attack.score_based), None)
    if version is None or "corruption" in version.attack.norms:
        return None
    attacked = setup.place_model(variant.attack_model)
    if setup.eot >= 2:
        return version, ExpectationModel(attacked, setup.eot // 2), setup.eot // 2
    draws = getattr(version.attack, "eot_iter", 0)  # an attack that averages its own draws (eot-pgd)
    if isinstance(draws, int) and draws >= 2:
        attack = dataclasses.replace(version.attack, eot_iter=draws // 2)  # type: ignore[call-arg]
        probe = _SameStarts(version.index, version.use, attack, version.restart, version.skipped, original=version)
        return probe, attacked, draws // 2
    return None


@dataclass(frozen=True)
class _SameStarts(Version):
    """A version with another attack parameter but the original's keys: the same random starts,
    so the probe's verdicts differ from the cell's by the draws alone."""

    original: Version = field(kw_only=True)

    def key(self, *context: object) -> str:
        """The original version's seed-key text."""
        return self.original.key(*context)


def eot_columns(check: EotCheck | None) -> dict[str, Any]:
    """The probe's columns of a cell's row (null, and the flag false, where no probe ran)."""
    if check is None:
        return {name: False if name.startswith("flag_") else None for name in EOT_COLUMNS}
    return {
        "eot_half": check.half,
        "eot_half_acc": check.half_acc,
        "eot_full_acc": check.full_acc,
        "eot_p": check.p,
        "flag_eot_not_converged": check.not_converged,
    }
