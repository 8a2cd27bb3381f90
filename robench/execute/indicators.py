"""Indicators of attack failure (Pintor et al., NeurIPS 2022): whether a cell's attack worked.

An attack that fails silently reports a model as robust when it only defeated the attack.
Pintor et al. give six measurable symptoms; robench computes each for every cell, as the
authors' code does (``pralab/IndicatorsOfAttackFailure``, ``src/indicators/indicators.py``;
thresholds are theirs where their code has one), on the cell's check samples: the first
:data:`~robench.execute.modelcheck.CHECK_SAMPLES` of its subset, the samples the model
checks use. So each indicator is one number per cell, whichever process attacks which of
its samples:

1. **silent success**: the attack's path reached an adversarial point but it returned a
   point that is not (engines that return the last iterate); share of the check samples the
   attack ran on;
2. **incomplete optimisation**: among the check samples the attack failed on, the share
   whose loss, rescaled to [0, 1] along the path and made monotone, still moved by more
   than 0.05 over the last 10 points: more steps, or larger ones, would have helped;
3. **transfer failure** (transfer versions): among the transfer examples that fool their
   surrogate, the share the evaluated model still classifies correctly;
4. **unavailable gradients**: no gradient path, or a zero or vanishing input gradient on
   any check sample (from the model checks);
5. **unstable predictions**: the attacker's loss's relative change under uniform noise of
   width 8/255, averaged over draws and samples, clipped to 1;
6. **unconstrained attack failure**: the cell's attack without an eps bound (the whole
   [0, 1] box) must fool every correctly classified check sample; the share it does not.

"The cell's attack" is its first white-box version that is not skipped. 1 and 2 read its
path, recorded while the cell runs it (robench/execute/attacktrace.py), if it is a gradient
attack (a random search such as Square keeps its best point, and its queries are proposals,
not a path). 6 reruns it without the bound, from the cell's own per-sample keys, on the
check samples it did not fool (one fooled inside the eps-ball is fooled inside the box). 5
and 6 draw from their own keys and fork torch's global generators, so the cell's numbers do
not depend on them.
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
from robench.context import ImageData, Threat
from robench.defense import Variant
from robench.execute.attacktrace import PathRecorder, attack_loss, isolated, still_moving
from robench.execute.engine import Judge, Outcome, Setup, TransferSource, deterministic
from robench.execute.modelcheck import ModelChecks
from robench.execute.versions import ExpectationModel, Version
from robench.losses import LossFn, cross_entropy
from robench.protocol import CLEAN_SOURCE

WINDOW, MOVE = 10, 0.05
"""Incomplete optimisation: the last points of the path, and the least change of the rescaled loss."""
NOISE_WIDTH = 8 / 255
"""Unstable predictions: noise drawn uniformly in [-width/2, width/2) per input element (the authors' radius)."""
NOISE_DRAWS = 4
"""Unstable predictions: noise draws per sample. The authors take 100; 4 over 32 samples is 128
relative changes, enough for a mean, for about the forward passes the model checks make."""
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
"""The six indicators, in the paper's order (the ``indicators`` column's)."""


@dataclass(frozen=True)
class CheckSamples:
    """The cell's check samples: inputs and labels on the device, dataset indices on the CPU."""

    x: Tensor
    y: Tensor
    idx: Tensor


@dataclass(frozen=True)
class Indicators:
    """One cell's indicators; NaN (``None`` for the boolean) where one does not apply.

    :param attack: the label of the version 1, 2 and 6 measure (``""`` without one)
    :param seconds: time they took, recording the path included
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


def measured_version(versions: list[Version]) -> Version | None:
    """The cell's attack for indicators 1, 2 and 6: its first white-box version that runs."""
    return next((v for v in versions if v.use.source is None and not v.skipped), None)


def path_recorder(
    versions: list[Version], threat: Threat, check: CheckSamples, data: ImageData, indices: Tensor, batch_size: int
) -> PathRecorder | None:
    """What records the path of :func:`measured_version` on the check samples while the cell
    runs it; ``None`` when there is no such path (no white-box gradient version, corruption)."""
    start = time.perf_counter()
    white = measured_version(versions)
    if white is None or not white.attack.needs_gradients or threat.norm == "corruption":
        return None
    usable = isolated(check.x, data, indices, threat, batch_size)
    recorder = PathRecorder(white.index, check.x, check.y, threat, attack_loss(white.attack), usable)
    recorder.seconds = time.perf_counter() - start
    return recorder


def measure_indicators(
    variant: Variant,
    versions: list[Version],
    threat: Threat,
    check: CheckSamples,
    setup: Setup,
    checks: ModelChecks,
    outcome: Outcome,
    recorder: PathRecorder | None,
    transfer_rows: Mapping[int, Tensor],
    surrogate: Callable[[str], nn.Module],
) -> Indicators:
    """The indicators of a cell evaluated as ``variant`` (as evaluated: placed, log outputs,
    randomized if found so) with ``versions``, once its attacks ran.

    :param outcome: the cell's outcomes (its first samples are the check samples)
    :param recorder: the path recorded during the cell's run (:func:`path_recorder`)
    :param transfer_rows: version index -> the check samples' rows of its transfer set
    :param surrogate: surrogate name -> its model, for transfer failure
    """
    start = time.perf_counter()
    recording = recorder.seconds if recorder is not None else 0.0
    if threat.norm == "corruption":  # no attack ran: nothing to diagnose
        return Indicators(seconds=time.perf_counter() - start)
    devices = [setup.device] if setup.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), deterministic(setup.device):
        found = _measure(variant, versions, threat, check, setup, checks, outcome, recorder, transfer_rows, surrogate)
    return dataclasses.replace(found, seconds=time.perf_counter() - start + recording)


def _measure(
    variant: Variant,
    versions: list[Version],
    threat: Threat,
    check: CheckSamples,
    setup: Setup,
    checks: ModelChecks,
    outcome: Outcome,
    recorder: PathRecorder | None,
    transfer_rows: Mapping[int, Tensor],
    surrogate: Callable[[str], nn.Module],
) -> Indicators:
    judge = Judge(setup.place_model(variant.model), setup.votes if variant.randomized else 1)
    attacked = setup.place_model(variant.attack_model)
    if variant.randomized and setup.eot > 1:  # what the cell's gradient attacks differentiate
        attacked = ExpectationModel(attacked, setup.eot)
    n = len(check.y)
    clean = outcome.clean[:n]
    white = measured_version(versions)
    share = checks.vanishing_share
    found = Indicators(
        attack=white.label if white is not None else "",
        unavailable_gradients=None if math.isnan(share) else bool(checks.no_gradient) or share > 0,
        unstable_predictions=_unstable(attacked, attack_loss(white.attack) if white else cross_entropy, check, setup),
        transfer_failure=_transfer_failure(judge, versions, check, clean, transfer_rows, surrogate, setup),
    )
    if white is None or not clean.any():
        return found
    ran = outcome.attacked[white.index][:n] & clean
    fooled = ran & ~outcome.versions[white.index][:n]
    keys = sample_keys(derive_key(setup.key, white.key()), check.idx)  # the cell's own starts
    missed = _unconstrained(white, judge, attacked, threat, check, clean & ~fooled, keys)
    found = dataclasses.replace(found, unconstrained_failure=missed / int(clean.sum()))
    if recorder is None:
        return found
    silent, incomplete = _path_indicators(recorder, ran, fooled)
    return dataclasses.replace(found, silent_success=silent, incomplete_optimization=incomplete)


def _path_indicators(recorder: PathRecorder, ran: Tensor, fooled: Tensor) -> tuple[float, float]:
    """Silent success and incomplete optimisation over the check samples whose path was recorded
    (NaN when there is none: an attack that queries transformed inputs, such as input diversity)."""
    path = recorder.path
    read = [i for i in ran.nonzero().squeeze(1).tolist() if path.fooled[i]]
    if not read:
        return math.nan, math.nan
    missed = [i for i in read if not fooled[i]]
    # silent success: fooled at some point of the path, not at the point returned
    silent = sum(any(path.fooled[i]) for i in missed)
    moving = sum(still_moving(path.losses[i], WINDOW, MOVE) for i in missed)
    return silent / len(read), moving / len(missed) if missed else 0.0


def _unconstrained(
    white: Version, judge: Judge, attacked: nn.Module, threat: Threat, check: CheckSamples, run: Tensor, keys: Tensor
) -> int:
    """How many of the check samples ``run`` selects ``white`` without an eps bound leaves correct."""
    if not run.any():
        return 0
    x, y = check.x[run.to(check.x.device)], check.y[run.to(check.y.device)]
    # the whole [0, 1] box: Linf radius 1, L2 radius the box's diagonal
    wide = Threat("linf", 1.0) if threat.norm == "linf" else Threat("l2", float(x[0].numel()) ** 0.5)
    x_adv = white.attack.perturb(attacked, x, y, wide, keys[run]).detach()
    return int(judge.correct(x_adv, y).sum())


def _unstable(attacked: nn.Module, loss: LossFn, check: CheckSamples, setup: Setup) -> float:
    """Mean relative change of the attacker's loss under small uniform noise, clipped to 1."""
    x, y = check.x, check.y
    noise = [
        sample_uniform(sample_keys(derive_key(setup.key, "unstable-predictions", draw), check.idx), x.shape[1:], -1, 1)
        for draw in range(NOISE_DRAWS)
    ]
    inputs = torch.cat([x, *((x + NOISE_WIDTH / 2 * d.to(x.device)).clamp(0, 1) for d in noise)])
    with torch.inference_mode():  # the draws in batches, as the cell batches its samples
        out = torch.cat([attacked(inputs[i : i + setup.batch_size]) for i in range(0, len(inputs), setup.batch_size)])
        losses = loss(out.float(), y.repeat(NOISE_DRAWS + 1)).view(NOISE_DRAWS + 1, len(y))
    reference = losses[0]
    scale = torch.where(reference == 0, torch.ones_like(reference), reference.abs())
    return min(float(((losses[1:] - reference).abs() / scale).mean()), 1.0)


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
