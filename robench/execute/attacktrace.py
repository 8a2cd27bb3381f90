"""The optimisation path of one attack run: what silent success and incomplete optimisation read.

Pintor et al.'s indicators read the attack's path (``attack.x_seq`` in SecML): every iterate
and the attacker's loss there. robench's attacks are plugins that return only their result,
so :class:`Trace` wraps the model they attack and records every forward pass instead: an
iterative attack evaluates the model at each iterate, so its queries are its path. Each
queried row is matched to the sample it perturbs (the clean input within the threat's
radius), which also follows attacks that drop samples from their batch once they are
fooled. The match is unambiguous when the batch's clean inputs lie more than twice the
radius apart; :func:`traced_run` attacks the samples in groups that do (one group, unless
some images are near-duplicates), which changes nothing for attacks whose random draws are
keyed per sample. A row that matches no sample (an attack that queries transformed inputs,
such as input diversity) makes the path unusable, and the indicators that need it are then
not computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robench.attack import Attack
from robench.context import Threat
from robench.losses import LossFn, cross_entropy, get_loss

MATCH_SLACK = 1e-4
"""Float slack on the radius when matching a queried row to its clean sample."""


def attack_loss(attack: object) -> LossFn:
    """The per-sample loss (to be maximised) an attack follows, read from its ``loss`` field:
    ``cw`` with its confidence, Square's ``margin`` (the CW margin at confidence 0); any other
    (cross-entropy, APGD's DLR) is scored with cross-entropy."""
    name = str(getattr(attack, "loss", "ce"))
    if name == "cw":
        return get_loss("cw", float(getattr(attack, "confidence", 0.1)))
    return get_loss("cw", 0.0) if name == "margin" else cross_entropy


@dataclass
class AttackPath:
    """Per check sample, the attacker's loss and the attacked model's verdict at each query;
    ``usable`` is False once a queried row matched no sample."""

    losses: list[list[float]]
    fooled: list[list[bool]]
    usable: bool = True


class Trace(nn.Module):
    """The attacked model, recording the path of the attack that queries it.

    :param model: the model the attack differentiates (with EOT for randomized models)
    :param clean: the check samples' clean inputs
    :param y: their labels
    :param threat: the threat the attack runs under (its radius matches rows to samples)
    :param loss: the attacker's per-sample loss
    """

    def __init__(self, model: nn.Module, clean: Tensor, y: Tensor, threat: Threat, loss: LossFn) -> None:
        super().__init__()
        self.model, self.threat, self.loss = model, threat, loss
        self.clean, self.y = clean.detach().flatten(1).float(), y
        self.path = AttackPath([[] for _ in range(len(y))], [[] for _ in range(len(y))])

    def forward(self, x: Tensor) -> Tensor:
        """The model's output; records each row's loss and verdict under its sample."""
        out: Tensor = self.model(x)
        with torch.no_grad():
            self.record(x.detach(), out.detach())
        return out

    def record(self, x: Tensor, out: Tensor) -> None:
        """Add one query of rows ``x`` with outputs ``out`` to the path."""
        who = self.match(x)
        if bool((who < 0).any()):
            self.path.usable = False
            return
        y = self.y[who]
        losses, fooled = self.loss(out.float(), y), out.argmax(dim=1) != y
        for i, loss, hit in zip(who.tolist(), losses.tolist(), fooled.tolist(), strict=True):
            self.path.losses[i].append(loss)
            self.path.fooled[i].append(hit)

    def match(self, x: Tensor) -> Tensor:
        """For each row, the index of the clean sample it lies within the radius of, else -1."""
        if x.dim() < 2 or x[0].numel() != self.clean.shape[1]:
            return torch.full((len(x),), -1, dtype=torch.long)
        p = float("inf") if self.threat.norm == "linf" else 2.0
        dist = torch.cdist(x.flatten(1).float(), self.clean.to(x.device), p=p)
        nearest, who = dist.min(dim=1)
        return torch.where(nearest <= self.threat.eps + MATCH_SLACK, who, torch.full_like(who, -1)).cpu()


def traced_run(
    attack: Attack, model: nn.Module, x: Tensor, y: Tensor, threat: Threat, keys: Tensor, loss: LossFn
) -> tuple[Tensor, AttackPath]:
    """``attack``'s adversarial inputs for ``x`` and its path, the returned point last."""
    x_adv = x.clone()
    path = AttackPath([[] for _ in range(len(y))], [[] for _ in range(len(y))])
    for group in separable_groups(x, threat):
        at = torch.tensor(group, device=x.device)
        trace = Trace(model, x[at], y[at], threat, loss)
        out = attack.perturb(trace, x[at], y[at], threat, keys[at.cpu()]).detach()
        with torch.no_grad():
            trace.record(out, model(out))  # the returned point closes the path
        x_adv[at] = out
        for j, i in enumerate(group):
            path.losses[i], path.fooled[i] = trace.path.losses[j], trace.path.fooled[j]
        path.usable &= trace.path.usable
    return x_adv, path


def separable_groups(x: Tensor, threat: Threat) -> list[list[int]]:
    """Positions of ``x`` in groups (greedily, in order) whose members lie more than twice the
    threat's radius apart, so that every point of a member's ball is nearest to that member."""
    p = float("inf") if threat.norm == "linf" else 2.0
    flat = x.detach().flatten(1).float()
    close = (torch.cdist(flat, flat, p=p) <= 2 * (threat.eps + MATCH_SLACK)).cpu()
    groups: list[list[int]] = []
    for i in range(len(x)):
        home = next((g for g in groups if not bool(close[i, g].any())), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    return groups


def still_moving(losses: list[float], window: int, move: float) -> bool:
    """Pintor et al.'s incomplete-optimisation test on one sample's path of a loss to maximise:
    rescaled to [0, 1], made monotone (its running best), it still changed by more than
    ``move`` over the last ``window`` points."""
    if len(losses) < 2:
        return False
    path = torch.tensor(losses, dtype=torch.float64)
    path = path - path.min()
    if float(path.max()) == 0:  # a flat loss: nothing moved (the authors' code would divide by 0)
        return False
    best = torch.cummax(path / path.max(), dim=0).values[-window:]
    return float(best.max() - best.min()) > move
