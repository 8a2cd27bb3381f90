"""Evaluate one cell: clean predictions, every version with early exit, outcomes.

Exactness of early exit: a sample is robust only if it is correct on the clean input and
under every version, so once a version fooled it (or it was wrong to begin with) further
versions cannot change its verdict; they are skipped. Each sample's random start comes from
a key derived from (protocol, threat, seed, version, sample index), never from its batch, so
neither early exit nor batch size changes any verdict (tests prove both).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robench.attack import derive_key, sample_keys
from robench.context import ImageData, Progress, Threat
from robench.defense import Variant
from robench.errors import RobenchError
from robench.execute.versions import ExpectationModel, Version
from robench.results.metrics import all_or_nothing

_TOLERANCE = 1e-5  # float slack when checking the eps-ball

# version -> adversarial inputs for every sample of the evaluation subset (transfer versions)
TransferSource = Callable[[Version], Tensor]


class Recorder(Protocol):
    """Watches one version's attack (robench/execute/attacktrace.py records its path)."""

    version: int
    """Index of the version whose attacked model :meth:`wrap` wraps."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model that version attacks, watched."""
        ...


class ThreatViolation(RobenchError):
    """An attack returned inputs outside its threat model: a bug in the attack."""


@dataclass
class Outcome:
    """Per-sample outcomes of one cell."""

    clean: Tensor  # bool (n,)
    versions: list[Tensor] = field(default_factory=list)  # bool (n,), True where not fooled
    attacked: list[Tensor] = field(default_factory=list)  # bool (n,), where the version ran
    robust: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    gradient_calls: int = 0  # sample-level forward passes with gradients during attacks
    queries: int = 0  # all sample-level forward passes through the attacked model during attacks
    seconds: float = 0.0
    clean_loss: float = 0.0
    adv_loss: float = 0.0


@dataclass(frozen=True)
class Judge:
    """Turns predictions into verdicts: one draw, or a majority of ``votes`` for random models."""

    model: nn.Module
    votes: int = 1

    def correct(self, x: Tensor, y: Tensor) -> Tensor:
        """True where the (majority) prediction is ``y``."""
        with torch.inference_mode():
            hits = torch.stack([self.model(x).argmax(dim=1) == y for _ in range(self.votes)])
        return hits.float().mean(dim=0) > 0.5


def check_threat(x_adv: Tensor, x: Tensor, threat: Threat, attack: str) -> None:
    """Raise :class:`ThreatViolation` unless ``x_adv`` is in [0, 1] and within eps of ``x``."""
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if threat.norm == "linf" else delta.norm(p=2, dim=1)
    worst = float(size.max()) if len(size) and threat.norm != "corruption" else 0.0  # no radius
    outside = float(x_adv.min()) < -_TOLERANCE or float(x_adv.max()) > 1 + _TOLERANCE
    if worst > threat.eps + _TOLERANCE or outside:
        raise ThreatViolation(
            f"attack {attack} returned inputs outside {threat.norm} eps={threat.eps:g} "
            f"or [0, 1] (largest perturbation {worst:.6g}); this is a bug in the attack"
        )


@dataclass(frozen=True)
class Setup:
    """How to run a cell's versions."""

    key: str  # names the protocol, threat and seed in every random-start key
    batch_size: int
    device: torch.device
    exhaustive: bool
    votes: int = 1  # used for randomized variants only
    eot: int = 0  # expectation draws for randomized variants (0 = attack one draw)
    # NHWC tensors: about +20 % attack throughput on the 2-core CPU and on GPUs; same math
    channels_last: bool = True

    def place(self, x: Tensor) -> Tensor:
        """Move a batch to the device, in the memory format the models use."""
        x = x.to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def place_model(self, model: nn.Module) -> nn.Module:
        """Put a model in eval mode on the device, in the memory format of :meth:`place` (in place)."""
        model = model.eval().to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """On CUDA, deterministic cuDNN kernels while attacking: the default convolution backward
    kernels use atomics, so the same keys could give different adversarial inputs and
    borderline verdicts would change between runs. A no-op on the CPU."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def evaluate(
    variant: Variant,
    versions: list[Version],
    threat: Threat,
    data: ImageData,
    indices: Tensor,
    *,
    setup: Setup,
    transfer: TransferSource,
    progress: Progress,
    recorder: Recorder | None = None,
) -> Outcome:
    """Clean and all-or-nothing robust outcomes of ``variant`` on ``data[indices]``.

    :param recorder: watches the attacked model while its version runs (the indicators of
        attack failure read the path); it changes no result
    """
    with deterministic(setup.device):
        return _evaluate(
            variant,
            versions,
            threat,
            data,
            indices,
            setup=setup,
            transfer=transfer,
            progress=progress,
            recorder=recorder,
        )


def _evaluate(
    variant: Variant,
    versions: list[Version],
    threat: Threat,
    data: ImageData,
    indices: Tensor,
    *,
    setup: Setup,
    transfer: TransferSource,
    progress: Progress,
    recorder: Recorder | None,
) -> Outcome:
    start = time.perf_counter()
    judge = Judge(setup.place_model(variant.model), setup.votes if variant.randomized else 1)
    counter = _Counting(setup.place_model(variant.attack_model))  # inside EOT: draws count one by one
    grad_model: nn.Module = counter
    if variant.randomized and setup.eot > 1:
        grad_model = ExpectationModel(counter, setup.eot)
    outcome = Outcome(clean=_correct_all(judge, data, indices, setup))
    robust = outcome.clean.clone()
    bar = progress.bar(len(versions), "versions")
    try:
        for version in versions:
            active = torch.ones_like(robust) if setup.exhaustive else robust.clone()
            if version.skipped:  # not run (no gradient path): attacks no sample, fools none
                active = torch.zeros_like(robust)
                correct = torch.ones_like(robust)
            elif version.use.source is None:
                model = grad_model
                if recorder is not None and recorder.version == version.index:
                    model = recorder.wrap(grad_model)  # the indicators read this version's path
                correct, losses = _whitebox(judge, model, version, threat, data, indices, active, setup)
                outcome.clean_loss += losses[0]
                outcome.adv_loss += losses[1]
            else:
                correct = _transfer(judge, transfer(version), data, indices, active, setup)
            outcome.versions.append(correct)
            outcome.attacked.append(active)
            robust &= correct
            bar.update(1, robust=float(robust.float().mean()))
    finally:
        bar.close()
    stacked = torch.stack(outcome.versions) if outcome.versions else torch.zeros(0, dtype=torch.bool)
    outcome.robust = all_or_nothing(outcome.clean, stacked)
    assert torch.equal(outcome.robust, robust)  # the running AND and the definition agree
    outcome.gradient_calls, outcome.queries = counter.gradient_calls, counter.queries
    outcome.seconds = time.perf_counter() - start
    return outcome


def generate(
    model: nn.Module, version: Version, threat: Threat, data: ImageData, indices: Tensor, setup: Setup
) -> Tensor:
    """Adversarial inputs of ``version`` against ``model`` for every sample (transfer sets)."""
    with deterministic(setup.device):
        return _generate(model, version, threat, data, indices, setup)


def _generate(
    model: nn.Module, version: Version, threat: Threat, data: ImageData, indices: Tensor, setup: Setup
) -> Tensor:
    out = []
    model = setup.place_model(model)
    for chunk in _chunks(torch.arange(len(indices)), setup.batch_size):
        idx = indices[chunk]
        x, y = data.batch(idx)
        x, y = setup.place(x), y.to(setup.device)
        keys = sample_keys(derive_key(setup.key, version.key()), idx)
        x_adv = version.attack.perturb(model, x, y, threat, keys).detach()
        check_threat(x_adv, x, threat, version.label)
        out.append(x_adv.cpu())
    return torch.cat(out)


def _whitebox(
    judge: Judge,
    grad_model: nn.Module,
    version: Version,
    threat: Threat,
    data: ImageData,
    indices: Tensor,
    active: Tensor,
    setup: Setup,
) -> tuple[Tensor, tuple[float, float]]:
    """Attack the active samples (survivors re-packed into full batches); True = not fooled.

    Also returns the summed cross-entropy on the clean and the adversarial inputs, for the
    "attack did not increase the loss" sanity flag.
    """
    correct = torch.ones(len(indices), dtype=torch.bool)
    clean_loss = adv_loss = 0.0
    base = derive_key(setup.key, version.key())
    for chunk in _chunks(active.nonzero().squeeze(1), setup.batch_size):
        idx = indices[chunk]
        x, y = data.batch(idx)
        x, y = setup.place(x), y.to(setup.device)
        x_adv = version.attack.perturb(grad_model, x, y, threat, sample_keys(base, idx)).detach()
        check_threat(x_adv, x, threat, version.label)
        correct[chunk] = judge.correct(x_adv, y).cpu()
        with torch.inference_mode():
            clean_loss += float(F.cross_entropy(judge.model(x), y, reduction="sum"))
            adv_loss += float(F.cross_entropy(judge.model(x_adv), y, reduction="sum"))
    return correct, (clean_loss, adv_loss)


def _transfer(judge: Judge, x_adv: Tensor, data: ImageData, indices: Tensor, active: Tensor, setup: Setup) -> Tensor:
    """Score the cached transfer examples of the active samples."""
    correct = torch.ones(len(indices), dtype=torch.bool)
    labels = data.labels[indices]
    for chunk in _chunks(active.nonzero().squeeze(1), setup.batch_size):
        x, y = setup.place(x_adv[chunk]), labels[chunk].to(setup.device)
        correct[chunk] = judge.correct(x, y).cpu()
    return correct


def _correct_all(judge: Judge, data: ImageData, indices: Tensor, setup: Setup) -> Tensor:
    parts = []
    for chunk in _chunks(indices, setup.batch_size):
        x, y = data.batch(chunk)
        parts.append(judge.correct(setup.place(x), y.to(setup.device)).cpu())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def _chunks(indices: Tensor, size: int) -> list[Tensor]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


class _Counting(nn.Module):
    """The attacked model, counting sample-level forward passes while attacks run.

    A wrapper rather than a forward hook, so that models which take no hooks (TorchScript)
    are counted too. Passes under inference mode are not counted; gradient-free attacks
    (Square) show up as queries without gradient calls.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.gradient_calls = 0
        self.queries = 0

    def forward(self, x: Tensor) -> Tensor:
        """The model's output; counts the batch."""
        if not torch.is_inference_mode_enabled():
            self.queries += int(x.shape[0])
            if torch.is_grad_enabled():
                self.gradient_calls += int(x.shape[0])
        out: Tensor = self.model(x)
        return out
