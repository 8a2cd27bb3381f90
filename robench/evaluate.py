"""Evaluate one cell: clean predictions, attack versions with early exit, outcomes.

Exactness of early exit: a sample is robust only if it is correct on the clean input and
under every version, so once a version fooled it (or it was wrong to begin with) further
versions cannot change its verdict; they are skipped. Each sample's random start comes from
a key derived from (attack, threat, seed, version, sample index), never from its batch, so
neither early exit nor batch size changes any verdict (tests prove both).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from robench.attack import Attack, derive_key, sample_keys
from robench.context import ImageData, Progress, Threat
from robench.defense import Variant
from robench.errors import RobenchError
from robench.metrics import all_or_nothing

_TOLERANCE = 1e-5  # float slack when checking the eps-ball


class ThreatViolation(RobenchError):
    """An attack returned inputs outside its threat model: a bug in the attack."""


@dataclass
class Outcome:
    """Per-sample outcomes of one cell."""

    clean: Tensor  # bool (n,)
    versions: list[Tensor] = field(default_factory=list)  # bool (n,), True where not fooled
    attacked: list[Tensor] = field(default_factory=list)  # bool (n,), where the version ran
    robust: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    forwards: int = 0
    seconds: float = 0.0


def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Predicted labels, without autograd bookkeeping."""
    with torch.inference_mode():
        labels: Tensor = model(x).argmax(dim=1)
    return labels


def check_threat(x_adv: Tensor, x: Tensor, threat: Threat, attack: str) -> None:
    """Raise :class:`ThreatViolation` unless ``x_adv`` is in [0, 1] and within eps of ``x``."""
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if threat.norm == "linf" else delta.norm(p=2, dim=1)
    worst = float(size.max()) if len(size) else 0.0
    if worst > threat.eps + _TOLERANCE or float(x_adv.min()) < -_TOLERANCE or float(x_adv.max()) > 1 + _TOLERANCE:
        raise ThreatViolation(
            f"attack {attack} returned inputs outside {threat.norm} eps={threat.eps:g} "
            f"or [0, 1] (largest perturbation {worst:.6g}); this is a bug in the attack"
        )


def evaluate(
    variant: Variant,
    attack: Attack,
    threat: Threat,
    data: ImageData,
    indices: Tensor,
    *,
    key: str,
    batch_size: int,
    device: torch.device,
    exhaustive: bool,
    progress: Progress,
) -> Outcome:
    """Clean and all-or-nothing robust outcomes of ``variant`` on ``data[indices]``.

    :param key: the part of every random-start key that names the protocol and threat
    """
    start = time.perf_counter()
    model = variant.model.eval().to(device)
    grad_model = variant.attack_model.eval().to(device)
    labels = data.labels[indices]
    outcome = Outcome(clean=_predict_all(model, data, indices, batch_size, device) == labels)
    robust = outcome.clean.clone()
    counter = _ForwardCounter(grad_model)
    n_versions = attack.n_versions()
    bar = progress.bar(n_versions, f"{attack.name} versions")
    try:
        for version in range(n_versions):
            active = torch.ones_like(robust) if exhaustive else robust.clone()
            correct = _run_version(
                model,
                grad_model,
                attack,
                threat,
                data,
                indices,
                active,
                base=derive_key(key, version),
                batch_size=batch_size,
                device=device,
            )
            outcome.versions.append(correct)
            outcome.attacked.append(active)
            robust &= correct
            bar.update(1, robust=float(robust.float().mean()))
    finally:
        bar.close()
        counter.remove()
    stacked = torch.stack(outcome.versions) if outcome.versions else torch.zeros(0, dtype=torch.bool)
    outcome.robust = all_or_nothing(outcome.clean, stacked)
    assert torch.equal(outcome.robust, robust)  # the running AND and the definition agree
    outcome.forwards = counter.count
    outcome.seconds = time.perf_counter() - start
    return outcome


def _predict_all(model: nn.Module, data: ImageData, indices: Tensor, batch_size: int, device: torch.device) -> Tensor:
    preds = [predict(model, data.batch(chunk)[0].to(device)).cpu() for chunk in _chunks(indices, batch_size)]
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def _run_version(
    model: nn.Module,
    grad_model: nn.Module,
    attack: Attack,
    threat: Threat,
    data: ImageData,
    indices: Tensor,
    active: Tensor,
    *,
    base: int,
    batch_size: int,
    device: torch.device,
) -> Tensor:
    """Attack the active samples (survivors re-packed into full batches); True = not fooled."""
    correct = torch.ones(len(indices), dtype=torch.bool)
    positions = active.nonzero().squeeze(1)
    for chunk in _chunks(positions, batch_size):
        idx = indices[chunk]
        x, y = data.batch(idx)
        x, y = x.to(device), y.to(device)
        x_adv = attack.perturb(grad_model, x, y, threat, sample_keys(base, idx)).detach()
        check_threat(x_adv, x, threat, attack.name)
        correct[chunk] = (predict(model, x_adv) == y).cpu()
    return correct


def _chunks(indices: Tensor, size: int) -> list[Tensor]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


class _ForwardCounter:
    """Counts sample-level forward passes through the attacked model."""

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if torch.is_grad_enabled():  # attack steps, not the scoring passes
            self.count += int(args[0].shape[0])

    def remove(self) -> None:
        self._handle.remove()
