"""Versions of a protocol, the models they attack, and the shared cache of transfer examples.

A version is one concrete way to make an adversarial input: attack + parameters + source
(the target itself, or a surrogate) + restart. Transfer examples depend only on (data
subset, surrogate, attack, parameters, eps, seed, restart), so they are generated once,
stored, and reused by every target and every later run; on load they are checked against
their key and the eps-ball.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from robench.attack import Attack
from robench.context import Norm, Threat
from robench.discover.registry import Registries
from robench.execute.keyedfiles import KeyedFiles
from robench.plan.grid import resolve_attack
from robench.protocol import AttackUse, Protocol

_FLOOR = 1e-40  # DVERGE clamps the mean probability before the log


@dataclass(frozen=True)
class Version:
    """One version of a protocol.

    ``skipped`` is empty, or why the version is not run on this cell (a gradient attack on a
    model with no gradient path, robench/execute/gradientpath.py): it then fools no sample.
    """

    index: int
    use: AttackUse
    attack: Attack
    restart: int
    skipped: str = ""

    @property
    def label(self) -> str:
        """Readable name, e.g. ``mifgsm[loss=cw]@baseline3#2``."""
        return f"{self.use.label()}#{self.restart}"

    def key(self, *context: object) -> str:
        """The seed-key text of this version: the attack, never the target (fair comparisons)."""
        return json.dumps([*map(str, context), self.use.attack.name, self.attack.canonical(), self.restart])


def expand(protocol: Protocol, registries: Registries, norm: Norm) -> list[Version]:
    """All versions of ``protocol``, in order."""
    versions: list[Version] = []
    for use in protocol.uses:
        attack = resolve_attack(registries, use.attack, norm)
        for restart in range(attack.n_versions()):
            versions.append(Version(len(versions), use, attack, restart))
    return versions


class Ensemble(nn.Module):
    """Members' prediction as the log of their mean softmax (DVERGE's ensemble output).

    A single member returns its logits unchanged.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        """Log mean probability (or the only member's logits)."""
        if len(self.members) == 1:
            out: Tensor = self.members[0](x)
            return out
        probs = torch.stack([m(x).softmax(dim=1) for m in self.members]).mean(dim=0)
        return probs.clamp_min(_FLOOR).log()


class ExpectationModel(nn.Module):
    """Expectation over transformation for a randomized model: the log of the mean softmax
    of ``draws`` forward passes, so gradient attacks see the expected prediction instead of
    one random draw (Athalye et al. 2018)."""

    def __init__(self, model: nn.Module, draws: int) -> None:
        super().__init__()
        self.model, self.draws = model, draws

    def forward(self, x: Tensor) -> Tensor:
        """Log mean probability over ``draws`` random forward passes."""
        probs = torch.stack([self.model(x).softmax(dim=1) for _ in range(self.draws)]).mean(dim=0)
        return probs.clamp_min(_FLOOR).log()


class TransferCache:
    """Adversarial examples from surrogates, on disk under ``<root>/transfer/``."""

    def __init__(self, root: Path) -> None:
        self.files = KeyedFiles(Path(root) / "transfer")
        self.root = self.files.root

    def get(self, key: dict[str, object], clean: Tensor, threat: Threat) -> Tensor | None:
        """The stored examples for ``key`` if present and valid (inside the threat's ball around
        ``clean``), else ``None``."""
        stored = self.files.load(key)
        x_adv = None if stored is None else stored.get("x_adv")
        if not isinstance(x_adv, Tensor) or x_adv.shape != clean.shape or not _inside(x_adv, clean, threat):
            return None
        return x_adv

    def put(self, key: dict[str, object], x_adv: Tensor) -> None:
        """Store atomically; a concurrent writer of the same key writes the same tensor."""
        self.files.save(key, {"x_adv": x_adv.detach().cpu().contiguous()})

    def name(self, key: dict[str, object]) -> str:
        """The file name of ``key``'s examples (recorded in result rows)."""
        return self.files.name(key)


def _inside(x_adv: Tensor, clean: Tensor, threat: Threat, tolerance: float = 1e-5) -> bool:
    delta = (x_adv - clean).flatten(1)
    size = delta.abs().amax(dim=1) if threat.norm == "linf" else delta.norm(dim=1)
    in_box = float(x_adv.min()) >= -tolerance and float(x_adv.max()) <= 1 + tolerance
    return in_box and (len(size) == 0 or float(size.max()) <= threat.eps + tolerance)
