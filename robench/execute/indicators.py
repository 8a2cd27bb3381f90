"""Indicators of attack failure (Pintor et al., NeurIPS 2022): whether a cell's attack worked.

An attack that fails silently reports a model as robust when it only defeated the attack.
Pintor et al. give six measurable symptoms; robench computes each for every cell, as the
authors' code does (``pralab/IndicatorsOfAttackFailure``, ``src/indicators/indicators.py``;
the thresholds are theirs where their code has one), on the cell's check samples: the first
:data:`~robench.execute.modelcheck.CHECK_SAMPLES` of its subset, the samples the model
checks use. So an indicator is one number per cell whatever executes the cell's attack, in
one piece or in shards, and costs a few attack runs on 32 samples:

1. **silent success**: the attack's path reached an adversarial point but it returned a
   point that is not (engines that return the last iterate); share of the correctly
   classified check samples;
2. **incomplete optimisation**: among the samples the attack failed on, the share whose
   loss, rescaled to [0, 1] along the path and made monotone, still moved by more than
   0.05 over the last 10 points: more steps, or a larger step, would have helped;
3. **transfer failure** (transfer versions): among the transfer examples that fool their
   surrogate, the share the evaluated model still classifies correctly;
4. **unavailable gradients**: no gradient path, or a zero or vanishing input gradient on
   any check sample (from the model checks);
5. **unstable predictions**: the attacker's loss's relative change under uniform noise of
   width 8/255, averaged over draws and samples, clipped to 1;
6. **unconstrained attack failure**: the cell's attack without an eps bound (the whole
   [0, 1] box) must fool every correctly classified check sample; the share it does not.

1, 2 and 6 run the cell's first white-box version that is not skipped, from the same
per-sample keys as in the cell, with its path recorded (robench/execute/attacktrace.py);
1 and 2 only if it is a gradient attack (a random search such as Square keeps its best point
and has proposals, not a path).
They draw from their own keys and fork torch's global generators, so the cell's numbers
do not depend on them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robench.attack import derive_key, sample_keys, sample_uniform
from robench.context import Threat
from robench.defense import Variant
from robench.execute.attacktrace import attack_loss, still_moving, traced_run
from robench.execute.engine import Judge, Setup, TransferSource, deterministic
from robench.execute.modelcheck import ModelChecks
from robench.execute.versions import ExpectationModel, Version
from robench.losses import LossFn, cross_entropy
from robench.protocol import CLEAN_SOURCE

WINDOW, MOVE = 10, 0.05
"""Incomplete optimisation: the last points of the path, and the least change of the rescaled loss."""
NOISE_WIDTH = 8 / 255
"""Unstable predictions: noise drawn uniformly in [-width/2, width/2) per input element (the authors' radius)."""
NOISE_DRAWS = 10
"""Unstable predictions: noise draws per sample. The authors take 100; 10 over 32 samples is 320
relative changes, enough for a mean, at a tenth of the cost."""
FIRES_ABOVE: dict[str, float] = {
    "silent_success": 0.0,  # any: the number counts a sample the attack had fooled
    "incomplete_optimization": 0.1,  # as the model checks' vanishing share: a tenth of the samples
    "transfer_failure": 0.5,  # most transfer examples that fooled their surrogate did not transfer
    "unstable_predictions": 0.1,  # ssg-research/combining-defenses' threshold on this metric
    "unconstrained_failure": 0.0,  # any: an unbounded attack must fool every sample
}
"""Value above which an indicator fires (the authors' code keeps per-sample booleans)."""
NAMES = (
    "silent_success",
    "incomplete_optimization",
    "transfer_failure",
    "unavailable_gradients",
    "unstable_predictions",
    "unconstrained_failure",
)
"""The six indicators, in the paper's order of the ``indicators`` column."""


@dataclass(frozen=True)
class CheckSamples:
    """The cell's check samples: inputs and labels on the device, dataset indices on the CPU."""

    x: Tensor
    y: Tensor
    idx: Tensor


@dataclass(frozen=True)
class Indicators:
    """One cell's indicators; NaN (``None`` for the boolean) where one does not apply.

    :param attack: the label of the white-box version indicators 1, 2 and 6 ran (or ``""``)
    :param seconds: time they took
    """

    attack: str = ""
    silent_success: float = math.nan
    incomplete_optimization: float = math.nan
    transfer_failure: float = math.nan
    unavailable_gradients: bool | None = None
    unstable_predictions: float = math.nan
    unconstrained_failure: float = math.nan
    seconds: float = 0.0

    def fired(self) -> list[str]:
        """Names of the indicators that fired, in :data:`NAMES` order."""
        found = {name: getattr(self, name) > limit for name, limit in FIRES_ABOVE.items()}  # NaN: never
        found["unavailable_gradients"] = bool(self.unavailable_gradients)
        return [name for name in NAMES if found[name]]

    def summary(self) -> str:
        """``ok``, the fired names comma-separated, or ``n/a`` when none was computed (corruption cells)."""
        computed = self.unavailable_gradients is not None or self.attack
        return ",".join(self.fired()) or ("ok" if computed else "n/a")

    def columns(self) -> dict[str, Any]:
        """The indicator columns of a cell's row (schema in robench/results/storage.py)."""
        return {
            "indicators": self.summary(),
            "indicator_attack": self.attack,
            **{f"indicator_{name}": getattr(self, name) for name in NAMES},
            "indicator_seconds": self.seconds,
        }


class TransferRows:
    """A cell's transfer source that also keeps the check samples' rows of each transfer set
    it hands out (transfer failure reads them after the attacks, without loading any set again)."""

    def __init__(self, source: TransferSource, n: int) -> None:
        self.source, self.n = source, n
        self.rows: dict[int, Tensor] = {}

    def __call__(self, version: Version) -> Tensor:
        """The version's set, from the wrapped source."""
        x_adv = self.source(version)
        if version.use.source != CLEAN_SOURCE:  # corruption sets have no surrogate to compare with
            self.rows[version.index] = x_adv[: self.n].clone()
        return x_adv


def measure_indicators(
    variant: Variant,
    versions: list[Version],
    threat: Threat,
    check: CheckSamples,
    setup: Setup,
    checks: ModelChecks,
    transfer_rows: Mapping[int, Tensor],
    surrogate: Callable[[str], nn.Module],
) -> Indicators:
    """The indicators of a cell evaluated as ``variant`` (as evaluated: placed, log outputs,
    randomized if found so) with ``versions``, on its check samples.

    :param transfer_rows: version index -> the check samples' rows of its transfer set
    :param surrogate: surrogate name -> its model, for transfer failure
    """
    start = time.perf_counter()
    if threat.norm == "corruption":  # no attack ran: nothing to diagnose
        return Indicators(seconds=time.perf_counter() - start)
    devices = [setup.device] if setup.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), deterministic(setup.device):
        found = _measure(variant, versions, threat, check, setup, checks, transfer_rows, surrogate)
    return dataclasses.replace(found, seconds=time.perf_counter() - start)


def _measure(
    variant: Variant,
    versions: list[Version],
    threat: Threat,
    check: CheckSamples,
    setup: Setup,
    checks: ModelChecks,
    transfer_rows: Mapping[int, Tensor],
    surrogate: Callable[[str], nn.Module],
) -> Indicators:
    judge = Judge(setup.place_model(variant.model), setup.votes if variant.randomized else 1)
    attacked = setup.place_model(variant.attack_model)
    if variant.randomized and setup.eot > 1:  # what the cell's gradient attacks differentiate
        attacked = ExpectationModel(attacked, setup.eot)
    clean = judge.correct(check.x, check.y).cpu()
    white = next((v for v in versions if v.use.source is None and not v.skipped), None)
    loss = attack_loss(white.attack) if white is not None else cross_entropy
    share = checks.vanishing_share
    found = Indicators(
        attack=white.label if white is not None else "",
        unavailable_gradients=None if math.isnan(share) else bool(checks.no_gradient) or share > 0,
        unstable_predictions=_unstable(attacked, loss, check, setup),
        transfer_failure=_transfer_failure(judge, versions, check, clean, transfer_rows, surrogate, setup),
    )
    if white is None or not clean.any():
        return found
    silent, incomplete, unconstrained = _white_box(white, judge, attacked, loss, threat, check, clean, setup)
    return dataclasses.replace(
        found, silent_success=silent, incomplete_optimization=incomplete, unconstrained_failure=unconstrained
    )


def _white_box(
    white: Version,
    judge: Judge,
    attacked: nn.Module,
    loss: LossFn,
    threat: Threat,
    check: CheckSamples,
    clean: Tensor,
    setup: Setup,
) -> tuple[float, float, float]:
    """Silent success, incomplete optimisation and unconstrained failure of version ``white``
    (the first two NaN when its path cannot be read, or is a random search's queries)."""
    keys = sample_keys(derive_key(setup.key, white.key()), check.idx)  # the cell's own starts
    unconstrained = _unconstrained(white, judge, attacked, threat, check, clean, keys)
    if not white.attack.needs_gradients:
        # A gradient-free search (Square) keeps its best point, and its queries are proposals,
        # not iterates: there is no path to read, and rerunning it would cost a whole search.
        return math.nan, math.nan, unconstrained
    # as in the cell, only the correctly classified samples are attacked
    x, y = check.x[clean.to(check.x.device)], check.y[clean.to(check.y.device)]
    x_adv, path = traced_run(white.attack, attacked, x, y, threat, keys[clean], loss)
    if not path.usable:  # the attack queried inputs that are not its iterates
        return math.nan, math.nan, unconstrained
    survived = judge.correct(x_adv, y).cpu().tolist()
    # silent success: fooled at some point of the path before the returned one, not at it
    silent = [ok and any(fooled[:-1]) for ok, fooled in zip(survived, path.fooled, strict=True)]
    moving = [still_moving(losses, WINDOW, MOVE) for ok, losses in zip(survived, path.losses, strict=True) if ok]
    return sum(silent) / len(silent), sum(moving) / len(moving) if moving else 0.0, unconstrained


def _unconstrained(
    white: Version, judge: Judge, attacked: nn.Module, threat: Threat, check: CheckSamples, clean: Tensor, keys: Tensor
) -> float:
    """Share of the correctly classified check samples that ``white`` without an eps bound leaves correct."""
    x, y = check.x[clean.to(check.x.device)], check.y[clean.to(check.y.device)]
    # the whole [0, 1] box: Linf radius 1, L2 radius the box's diagonal
    wide = Threat("linf", 1.0) if threat.norm == "linf" else Threat("l2", float(x[0].numel()) ** 0.5)
    x_adv = white.attack.perturb(attacked, x, y, wide, keys[clean]).detach()
    return float(judge.correct(x_adv, y).float().mean())


def _unstable(attacked: nn.Module, loss: LossFn, check: CheckSamples, setup: Setup) -> float:
    """Mean relative change of the attacker's loss under small uniform noise, clipped to 1."""
    x, y = check.x, check.y
    with torch.inference_mode():
        reference = loss(attacked(x).float(), y)
        scale = torch.where(reference == 0, torch.ones_like(reference), reference.abs())
        total = 0.0
        for draw in range(NOISE_DRAWS):
            keys = sample_keys(derive_key(setup.key, "unstable-predictions", draw), check.idx)
            noise = sample_uniform(keys, x.shape[1:], -NOISE_WIDTH / 2, NOISE_WIDTH / 2).to(x.device)
            changed = loss(attacked((x + noise).clamp(0, 1)).float(), y)
            total += float(((reference - changed).abs() / scale).mean())
    return min(total / NOISE_DRAWS, 1.0)


def _transfer_failure(
    judge: Judge,
    versions: list[Version],
    check: CheckSamples,
    clean: Tensor,
    transfer_rows: Mapping[int, Tensor],
    surrogate: Callable[[str], nn.Module],
    setup: Setup,
) -> float:
    """Among (check sample, transfer version) pairs whose example fools its surrogate, the share
    the evaluated model still classifies correctly; NaN without transfer versions."""
    fooled_surrogate = kept = 0
    models: dict[str, nn.Module] = {}
    for version in versions:
        source = version.use.source
        if source is None or version.skipped or version.index not in transfer_rows:
            continue
        if source not in models:
            models[source] = setup.place_model(surrogate(source))
        x_adv = setup.place(transfer_rows[version.index])
        with torch.inference_mode():
            transferred = (models[source](x_adv).argmax(dim=1) != check.y).cpu() & clean
        fooled_surrogate += int(transferred.sum())
        kept += int((transferred & judge.correct(x_adv, check.y).cpu()).sum())
    return kept / fooled_surrogate if fooled_surrogate else math.nan
