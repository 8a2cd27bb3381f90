"""The optimisation path of a cell's attack on its check samples: what silent success and
incomplete optimisation read.

Pintor et al.'s indicators read the attack's path (``attack.x_seq`` in SecML): every iterate
and the attacker's loss there. robench's attacks are plugins that return only their result,
so a :class:`PathRecorder` wraps the model the cell's first white-box version attacks, while
the cell runs it, and records the forward passes instead: an iterative attack evaluates the
model at each iterate, so its queries are its path. This costs no attack run of its own.

Each queried row is matched to the check sample it perturbs: the one whose clean input lies
within the threat's radius. The match cannot mistake another sample of the batch for it if
no other sample of the evaluation subset lies within twice the radius; check samples with
such a near-duplicate (:func:`isolated`) are left out. Rows that match no check sample are
the other samples of the batch, or inputs an attack transformed before querying (input
diversity): a check sample the version attacked with no recorded row has no readable path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from robench.context import ImageData, Threat
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
    """Per check sample, the attacker's loss and the attacked model's verdict at each query."""

    losses: list[list[float]]
    fooled: list[list[bool]]


@dataclass
class PathRecorder:
    """Records the path of version ``version`` on the check samples while the cell attacks them.

    :param version: index of the version to record (the engine wraps its model with :meth:`wrap`)
    :param clean: the check samples' clean inputs (on the models' device)
    :param y: their labels
    :param threat: the cell's threat (its radius matches rows to samples)
    :param loss: the attacker's per-sample loss
    :param usable: check samples without a near-duplicate in the subset (see :func:`isolated`)
    """

    version: int
    clean: Tensor
    y: Tensor
    threat: Threat
    loss: LossFn
    usable: Tensor
    path: AttackPath = field(init=False)
    seconds: float = 0.0
    """Time spent recording (inside the attack's own time)."""

    def __post_init__(self) -> None:
        self.path = AttackPath([[] for _ in range(len(self.y))], [[] for _ in range(len(self.y))])
        self._flat = self.clean.detach().flatten(1).float()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model``, recording every query into this recorder."""
        return _Recording(model, self)

    def record(self, x: Tensor, out: Tensor) -> None:
        """Add the rows of one query that perturb a usable check sample."""
        start = time.perf_counter()
        who = self.match(x)
        rows = (who >= 0).nonzero().squeeze(1)
        if len(rows):
            at = who[rows]
            logits, y = out[rows.to(out.device)].float(), self.y[at.to(self.y.device)]
            losses, fooled = self.loss(logits, y), logits.argmax(dim=1) != y
            for i, loss, hit in zip(at.tolist(), losses.tolist(), fooled.tolist(), strict=True):
                self.path.losses[i].append(loss)
                self.path.fooled[i].append(hit)
        self.seconds += time.perf_counter() - start

    def match(self, x: Tensor) -> Tensor:
        """For each row, the usable check sample it lies within the radius of, else -1 (on the CPU)."""
        if x.dim() < 2 or x[0].numel() != self._flat.shape[1]:
            return torch.full((len(x),), -1, dtype=torch.long)
        p = float("inf") if self.threat.norm == "linf" else 2.0
        nearest, who = torch.cdist(x.detach().flatten(1).float(), self._flat.to(x.device), p=p).min(dim=1)
        who = who.cpu()
        near = (nearest <= self.threat.eps + MATCH_SLACK).cpu() & self.usable[who]
        return torch.where(near, who, torch.full_like(who, -1))


class _Recording(nn.Module):
    """A model whose forward passes go into a :class:`PathRecorder`."""

    def __init__(self, model: nn.Module, recorder: PathRecorder) -> None:
        super().__init__()
        self.model, self.recorder = model, recorder

    def forward(self, x: Tensor) -> Tensor:
        """The model's output; the recorder keeps each check sample's loss and verdict."""
        out: Tensor = self.model(x)
        with torch.no_grad():
            self.recorder.record(x.detach(), out.detach())
        return out


def isolated(clean: Tensor, data: ImageData, indices: Tensor, threat: Threat, batch_size: int) -> Tensor:
    """Which of ``clean`` (the first samples of ``indices``) have no other sample of the subset
    within twice the threat's radius: rows near them can only be their own perturbations."""
    p = float("inf") if threat.norm == "linf" else 2.0
    flat = clean.detach().flatten(1).float().cpu()
    neighbours = torch.zeros(len(flat), dtype=torch.long)
    for start in range(0, len(indices), batch_size):
        others = data.batch(indices[start : start + batch_size])[0].flatten(1).float()
        neighbours += (torch.cdist(flat, others, p=p) <= 2 * (threat.eps + MATCH_SLACK)).sum(dim=1)
    return neighbours <= 1  # itself


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
