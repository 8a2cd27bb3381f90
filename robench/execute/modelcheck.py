"""Model checks run before every attack: the traps that make a robustness number wrong.

A defense from a third party can hide the classic evaluation traps and still get a
clean-looking row. Before a cell's attacks run, :func:`check_model` probes the variant on a
small batch of the cell's own evaluation samples, after AutoAttack's checks (Croce & Hein,
``autoattack/checks.py``: randomized, softmax output, zero gradients, number of classes) and
Carlini et al.'s checklist:

* **output contract**: one floating tensor of shape (batch, classes) with finite values,
  from the prediction model and from the model attacks differentiate; anything else raises
  :class:`ModelContractError` (the cell becomes an ``error`` row) before any attack runs;
* **probabilities**: outputs non-negative and summing to 1 per sample; the cell is flagged
  and attacks get the log of the output (CE or CW on probabilities is a weak attack);
* **randomized**: repeated predictions on the same inputs differ; an undeclared random
  variant is evaluated as randomized (EOT and votes) and flagged;
* **vanishing gradients**: the input gradient is zero or below a floor on a share of the
  samples (input rounding, saturated logits); the runner then adds transfer and Square
  versions (:func:`with_masking_versions`), after Athalye et al.'s obfuscated-gradients
  diagnosis: an attack that needs no gradient of the defended model cannot be masked by it;
* **no gradient path**: the output does not depend differentiably on the input at all (no
  ``grad_fn``, a ``None`` input gradient, a backward that raises;
  robench/execute/gradientpath.py): the same versions are added, and the white-box versions
  that need gradients are skipped with the reason, instead of failing with autograd's error;
* **batch dependence**: a sample's prediction changes when the rest of its batch changes
  (BatchNorm left in training mode, a batch-level gate).

Written here because no library runs these as a step of its own: AutoAttack's checks print
warnings inside ``run_standard_evaluation`` and are not importable as results.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robench.bpda import with_preprocess
from robench.defense import Variant
from robench.discover.registry import Registries
from robench.errors import RobenchError
from robench.execute.engine import Outcome
from robench.execute.gradientpath import Probe, probe
from robench.execute.versions import Version
from robench.plugin import PluginSpec
from robench.protocol import AttackUse, Protocol, Surrogate

CHECK_SAMPLES = 32
"""Evaluation samples the checks run on: the first of the cell's subset."""
REPEATS = 3
"""Predictions of the same batch compared by the randomness check. Three, not AutoAttack's two:
a random gate drawn once per batch from k paths repeats itself with probability 1/k per
comparison, and a third draw costs about 0.5 % of a default cell."""
RANDOM_TOLERANCE = 1e-5
"""Largest output change between repeats, relative to the output's scale, that is not randomness."""
BATCH_TOLERANCE = 1e-3
"""Largest output change when the batch is split, relative to the scale: float sums over other
batch sizes may use other kernels, so this is looser than :data:`RANDOM_TOLERANCE`."""
GRADIENT_FLOOR = 1e-10
"""Mean absolute input gradient of the logit margin per input element below which it vanishes."""
VANISHING_SHARE = 0.1
"""Share of check samples with vanishing gradients from which the cell is flagged."""
PROBABILITY_SLACK = 1e-4
"""How far from 1 a row of probabilities may sum."""
CHECK_SURROGATE = "check-baseline"
"""Name of the surrogate the masking diagnosis adds (the cell's architecture, trained by ``baseline``)."""
CHECK_SURROGATE_SEED = 1000
"""Its seed: held out from the targets' seeds, so the transfer is black-box."""


class ModelContractError(RobenchError):
    """A variant's model does not return one finite tensor of logits of shape (batch, classes)."""


@dataclass(frozen=True)
class ModelChecks:
    """What the checks found on one variant.

    :param samples: check samples used
    :param randomized: repeated predictions on the same inputs differed
    :param probabilities: the prediction model's outputs are probabilities
    :param attack_probabilities: the attacked model's (``Variant.attack_model``) outputs are
    :param vanishing_share: share of samples whose input gradient is zero or below the floor
    :param batch_dependent: a sample's prediction changed with the rest of its batch
        (not checked, ``False``, for randomized models: their predictions change anyway)
    :param training_modules: submodules still in training mode after ``eval()``
    :param seconds: time the checks took
    :param no_gradient: why the attacked model has no gradient path from input to output,
        or ``""`` (then ``vanishing_share`` is 1: no sample has a gradient)
    """

    samples: int
    randomized: bool
    probabilities: bool
    attack_probabilities: bool
    vanishing_share: float
    batch_dependent: bool
    training_modules: tuple[str, ...] = ()
    seconds: float = 0.0
    no_gradient: str = ""

    @property
    def vanishing(self) -> bool:
        """Whether enough samples have vanishing gradients to suspect gradient masking."""
        return self.vanishing_share >= VANISHING_SHARE

    def fired(self, declared_randomized: bool) -> list[str]:
        """Names of the checks that fired; declared randomness is expected, not a finding."""
        found = {
            "undeclared_randomness": self.randomized and not declared_randomized,
            "probability_outputs": self.probabilities or self.attack_probabilities,
            "vanishing_gradients": self.vanishing and not self.no_gradient,  # no path: its own finding
            "batch_dependent": self.batch_dependent,
            "no_gradient_path": bool(self.no_gradient),
        }
        return [name for name, hit in found.items() if hit]

    def describe(self, declared_randomized: bool) -> str:
        """One line: ``ok`` or what fired and what robench does about it."""
        parts = []
        if self.randomized:
            parts.append("randomized (declared)" if declared_randomized else "randomized, NOT declared: run with EOT")
        if self.probabilities or self.attack_probabilities:
            parts.append("outputs probabilities: attacks get their log")
        if self.no_gradient:
            parts.append(f"no gradient path ({self.no_gradient}): gradient versions skipped, transfer and Square added")
        elif self.vanishing:
            parts.append(f"vanishing gradients on {100 * self.vanishing_share:.0f} %: transfer and Square added")
        if self.batch_dependent:
            parts.append("prediction depends on the batch")
        if self.training_modules:
            parts.append(f"in training mode after eval(): {', '.join(self.training_modules[:3])}")
        return "; ".join(parts) or "ok"


class LogOutput(nn.Module):
    """The log of a model's probability outputs: what attacks and the judge see instead."""

    def __init__(self, model: nn.Module, floor: float = 1e-40) -> None:
        super().__init__()
        self.model, self.floor = model, floor

    def forward(self, x: Tensor) -> Tensor:
        """Log-probabilities (clamped away from log 0)."""
        out: Tensor = self.model(x)
        return out.clamp_min(self.floor).log()


def check_model(variant: Variant, x: Tensor, y: Tensor, num_classes: int) -> ModelChecks:
    """Run every check on ``variant`` with inputs ``x`` (on the models' device) and labels ``y``.

    A variant that declares ``preprocess`` is checked as robench evaluates it: predicting
    through the transformation, attacked through its BPDA (:func:`robench.bpda.with_preprocess`).

    :raises ModelContractError: if a model breaks the output contract
    """
    start = time.perf_counter()
    variant = with_preprocess(variant)
    model, attacked = variant.model.eval(), variant.attack_model.eval()
    with torch.inference_mode():
        outputs = [model(x) for _ in range(REPEATS)]
        attacked_out = attacked(x) if attacked is not model else outputs[0]
    for what, out in (("model", outputs[0]), ("attack model (grad_model)", attacked_out)):
        contract_problem = _contract_problem(out, len(x), num_classes)
        if contract_problem:
            raise ModelContractError(
                f"variant {variant.name!r}: its {what} returned {contract_problem}; expected one floating "
                f"tensor of shape ({len(x)}, {num_classes}) with finite values: a logit per class, per sample"
            )
    attack_probabilities = _probabilities(attacked_out)
    randomized = any(_changed(outputs[0], out, RANDOM_TOLERANCE) for out in outputs[1:])
    grad_model = LogOutput(attacked) if attack_probabilities else attacked
    gradient = probe(grad_model, x, y)
    return ModelChecks(
        samples=len(x),
        randomized=randomized,
        probabilities=_probabilities(outputs[0]),
        attack_probabilities=attack_probabilities,
        vanishing_share=vanishing_share(gradient, y),
        batch_dependent=not randomized and _batch_dependent(model, x, outputs[0]),
        training_modules=tuple(name or type(model).__name__ for name, m in model.named_modules() if m.training),
        seconds=time.perf_counter() - start,
        no_gradient=gradient.problem,
    )


def as_evaluated(variant: Variant, checks: ModelChecks) -> Variant:
    """The variant as robench evaluates it: randomized if found random, and the log of any
    model's probability outputs (the prediction's argmax, and so every verdict, is unchanged)."""
    variant = with_preprocess(variant)
    model = LogOutput(variant.model) if checks.probabilities else variant.model
    grad_model = variant.grad_model
    if grad_model is not None and checks.attack_probabilities:
        grad_model = LogOutput(grad_model)
    return dataclasses.replace(
        variant, model=model, grad_model=grad_model, randomized=variant.randomized or checks.randomized
    )


def vanishing_share(gradient: Probe, y: Tensor) -> float:
    """Share of samples whose input gradient vanishes, for the losses attacks use.

    A sample's gradient vanishes if there is none (no gradient path), if it is not finite,
    if the gradient of the logit margin (true logit minus the largest other; it does not
    saturate with confidence) is below :data:`GRADIENT_FLOOR` per input element, or if the
    cross-entropy gradient is exactly zero (saturated logits: the default loss of every
    gradient attack then takes no step).
    """
    if gradient.margin_grad is None:  # the output does not depend on the input at all
        return 1.0
    logits = gradient.logits
    flat = gradient.margin_grad.flatten(1)
    broken = ~torch.isfinite(flat).all(dim=1)
    faint = flat.abs().mean(dim=1) < GRADIENT_FLOOR
    # The cross-entropy gradient is (softmax - one-hot) times the same Jacobian: exactly zero
    # where the softmax is exactly one-hot, which the logits alone tell (no second backward).
    with torch.no_grad():
        probs = logits.detach().float().softmax(dim=1)
        saturated = (probs == nn.functional.one_hot(y, logits.shape[1]).float()).all(dim=1)
    return float((broken | faint | saturated).float().mean())


def with_masking_versions(
    protocol: Protocol, registries: Registries, baseline: PluginSpec, preset: str, *, no_gradient: bool = False
) -> Protocol:
    """``protocol`` plus what diagnoses gradient masking, unless it already has them: a transfer
    version from the cell's architecture trained by ``baseline`` (a held-out seed) and a
    gradient-free Square version. The added uses come last, so early exit runs them only on
    the samples the protocol's own versions could not fool.

    With ``no_gradient`` (the model has no gradient path), a score-based use that also needs
    gradients (AutoAttack) will be skipped, so it does not stand in for Square."""
    uses, surrogates = list(protocol.uses), list(protocol.surrogates)
    if not protocol.is_transfer():
        surrogates.append(Surrogate(CHECK_SURROGATE, baseline, (CHECK_SURROGATE_SEED,)))
        uses.append(AttackUse(PluginSpec.of("pgd", {"restarts": 1, "stop_on_success": False}), CHECK_SURROGATE))
    attacks = [registries.attacks.get(use.attack.name) for use in protocol.uses]
    if not any(a.score_based and not (no_gradient and a.needs_gradients) for a in attacks):
        uses.append(AttackUse(PluginSpec.of("square", {"n_queries": 5000 if preset == "paper" else 1000})))
    return dataclasses.replace(protocol, uses=tuple(uses), surrogates=tuple(surrogates))


def check_columns(checks: ModelChecks, declared_randomized: bool, out: Outcome, added: list[Version]) -> dict[str, Any]:
    """The model-check columns of a cell's row (schema in robench/results/storage.py).

    ``added`` are the versions :func:`with_masking_versions` added to the protocol; for each
    added use, ``masking_found_by`` counts the samples it fooled that the protocol's own
    versions had not (in early-exit mode an added version sees only the samples still
    robust, so a later use is credited only with what the earlier ones left)."""
    found: dict[str, int] = {}
    if added:
        first = added[0].index
        own = out.clean.clone()
        for correct in out.versions[:first]:
            own &= correct
        for version in added:
            fooled = int((own & ~out.versions[version.index]).sum())
            found[version.use.label()] = found.get(version.use.label(), 0) + fooled
    return {
        "checks": ",".join(checks.fired(declared_randomized)) or "ok",
        "check_samples": checks.samples,
        "check_seconds": checks.seconds,
        "check_randomized": checks.randomized,
        "flag_undeclared_randomness": checks.randomized and not declared_randomized,
        "flag_probability_outputs": checks.probabilities or checks.attack_probabilities,
        "check_vanishing_share": checks.vanishing_share,
        "flag_vanishing_gradients": checks.vanishing and not checks.no_gradient,
        "masking_found_by": json.dumps(found, sort_keys=True) if added else "",
        "flag_batch_dependent": checks.batch_dependent,
        "flag_no_gradient_path": bool(checks.no_gradient),
        "no_gradient_reason": checks.no_gradient,
    }


def _contract_problem(out: object, batch: int, num_classes: int) -> str:
    """What is wrong with a model's output, or ``""``."""
    if not isinstance(out, Tensor):
        return _describe(out)
    if not out.is_floating_point():
        return f"a tensor of dtype {out.dtype}"
    if tuple(out.shape) != (batch, num_classes):
        return f"a tensor of shape {tuple(out.shape)}"
    bad = int((~torch.isfinite(out)).sum())
    return f"a tensor with {bad} non-finite values (nan or inf)" if bad else ""


def _describe(out: object) -> str:
    if isinstance(out, Tensor):
        return f"tensor {tuple(out.shape)}"
    if isinstance(out, tuple | list):
        inner = ", ".join(_describe(o) for o in out[:4]) + (", ..." if len(out) > 4 else "")
        return f"a {type(out).__name__} of {len(out)} ({inner})"
    if isinstance(out, dict):
        return f"a dict with keys {sorted(map(str, out))[:6]}"
    return f"a {type(out).__name__}"


def _probabilities(out: Tensor) -> bool:
    return bool((out >= -PROBABILITY_SLACK).all()) and bool(((out.sum(dim=1) - 1).abs() <= PROBABILITY_SLACK).all())


def _changed(a: Tensor, b: Tensor, tolerance: float) -> bool:
    """Whether ``b`` differs from ``a`` in any verdict or beyond ``tolerance`` of ``a``'s scale."""
    if not torch.equal(a.argmax(dim=1), b.argmax(dim=1)):
        return True
    scale = 1.0 + float(a.abs().max()) if a.numel() else 1.0
    return float((a - b).abs().max()) > tolerance * scale if a.numel() else False


def _batch_dependent(model: nn.Module, x: Tensor, whole: Tensor) -> bool:
    """Predict the two halves of the batch on their own: the same samples, other batch-mates."""
    if len(x) < 4:
        return False
    half = len(x) // 2
    with torch.inference_mode():
        split = torch.cat([model(x[:half]), model(x[half:])])
    scale = 1.0 + float(whole.abs().max())
    return float((whole - split).abs().max()) > BATCH_TOLERANCE * scale
