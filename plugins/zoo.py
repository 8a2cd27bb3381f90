"""Attacks torchattacks already has, wrapped for robench: EOT-PGD, APGD, Square, AutoAttack.

EOT-PGD keeps robench's per-sample keyed random starts (it is plugins/pgd.py's PGD with the
gradient averaged over draws of a randomized model, through plugins/transfer.py's
:class:`~robench.plugins._keyed.KeyedIterative`).

APGD, Square and AutoAttack are torchattacks' own code, which takes ONE seed for the whole
batch and reseeds the global generators with it. Their random starts and queries therefore
depend on which samples share the batch: they declare ``batch_seeded = True``, so the
runner and ``check_attack`` know a sample's result may change with the batching (DESIGN.md
§5 cannot hold for them). The seed is derived from the batch's keys, so the same batch with
the same keys gives the same result, and the caller's global generators are restored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor, nn

import robench
from robench import Norm
from robench.plugins.pgd import PGD, engine_settings

if TYPE_CHECKING:
    from torchattacks.attack import Attack as TorchAttack

# torchattacks is imported inside each perturb(): importing it costs about 1.5 s (its attacks
# pull in scipy), which `robench list` and plugin-name errors should not wait for.

_TA_NORM: dict[Norm, str] = {"linf": "Linf", "l2": "L2"}
"""robench's norm names -> torchattacks'."""


def batch_seed(keys: Tensor) -> int:
    """The one seed torchattacks takes for a whole batch: the batch's first key, modulo 2**31."""
    return int(keys[0]) % 2**31


def run_reseeding(attack: TorchAttack, x: Tensor, y: Tensor) -> Tensor:
    """Run a torchattacks attack that reseeds the global generators, then restore them.

    APGD, Square and FAB call ``torch.manual_seed(seed)``; without the fork every later
    global draw in the process (dropout, a randomized model's gates) would repeat.
    """
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        out: Tensor = attack(x, y)
    return out.detach()


def check_square_fits(x: Tensor, threat: robench.Threat) -> None:
    """Reject images torchattacks' L2 Square cannot run on, with a clear message.

    Its L2 code assumes square images, and its initialisation tiles them with squares of
    side ``H // 5`` starting ``(H mod 5) // 2`` pixels in: it fails with a broadcast error
    when a tile overruns the edge (e.g. 12x12 or 14x14). Every square image of side 25 or
    more fits; the checked rule was compared with torchattacks 3.5.1 on sides 1 to 39.

    :raises ValueError: when torchattacks would fail
    """
    h, w = x.shape[-2:]
    side = h // 5
    # with side 1 an overrunning tile is empty, which broadcasts; a wider one does not
    fits = h == w and side > 0 and (side == 1 or (h - 5 * side) // 2 + (h // side) * side <= h)
    if threat.norm == "l2" and not fits:
        raise ValueError(f"square (L2) cannot run on {h}x{w} images: torchattacks' initial tiles do not fit them")


@dataclass(frozen=True, kw_only=True)
class EOTPGD(PGD):
    """PGD with expectation over transformation (Athalye et al. 2018) for randomized models.

    Distance measure: Linf or L2.
    plugins/pgd.py's PGD (keyed random starts, restarts as versions, CE or CW loss) whose
    every step follows the gradient summed over ``eot_iter`` forward/backward passes of the
    model, each drawing the model's randomness afresh (torchattacks' EOTPGD, which is Linf
    and cross-entropy only and starts per batch). With ``eot_iter=1`` it is PGD. The
    model's own randomness comes from wherever the model draws it, not from the keys.

    Args:
        steps: number of gradient steps.
        step_size: step size as a fraction of eps.
        restarts: number of random restarts; each is a separate version.
        random_start: start each restart at a random point of the eps-ball.
        loss: ``ce`` (cross-entropy) or ``cw`` (CW margin).
        confidence: the CW margin's confidence.
        stop_on_success: freeze a sample at its first iterate misclassified by the mean
            probability of the step's draws (as PGD, which it is with one draw).
        eot_iter: forward/backward passes averaged per step.
    """

    name: ClassVar[str] = "eot-pgd"
    eot_iter: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eot_iter < 1:
            raise ValueError("eot_iter must be >= 1")

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, threat: robench.Threat, keys: Tensor) -> Tensor:
        """Run EOT-PGD from the per-sample start given by ``keys``."""
        settings = engine_settings(self, x, threat, keys)
        from robench.plugins._keyed import KeyedIterative  # torchattacks: imported when an attack runs

        attack = KeyedIterative(model, **settings, stop_on_success=self.stop_on_success, eot_iter=self.eot_iter)
        out: Tensor = attack(x, y)
        return out


@dataclass(frozen=True, kw_only=True)
class APGD(robench.Attack):
    """Auto-PGD (Croce & Hein 2020): PGD with an adaptive step size, via ``torchattacks.APGD``.

    Distance measure: Linf or L2.

    BATCH-SEEDED: torchattacks draws every sample's random start from one seed for the
    whole batch (derived here from the batch's keys), so a sample's result depends on the
    batch it is attacked in (``batch_seeded = True``). Samples it does not fool are
    returned unchanged.

    Args:
        steps: number of iterations.
        restarts: number of random restarts; each is a separate version.
        loss: ``ce`` (cross-entropy) or ``dlr`` (difference of logits ratio).
        rho: the step-size decay checkpoint threshold.
    """

    name: ClassVar[str] = "apgd"
    norms: ClassVar[frozenset[Norm]] = frozenset({"linf", "l2"})
    batch_seeded: ClassVar[bool] = True
    steps: int = 100
    restarts: int = 1
    loss: Literal["ce", "dlr"] = "ce"
    rho: float = 0.75

    def __post_init__(self) -> None:
        if self.steps < 1 or self.restarts < 1:
            raise ValueError("steps and restarts must be >= 1")
        if not 0 < self.rho < 1:
            raise ValueError("rho must be in (0, 1)")

    def n_versions(self) -> int:
        """One version per restart."""
        return self.restarts

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, threat: robench.Threat, keys: Tensor) -> Tensor:
        """One APGD run seeded from the batch's keys."""
        import torchattacks

        attack = torchattacks.APGD(
            model,
            norm=_TA_NORM[threat.norm],
            eps=threat.eps,
            steps=self.steps,
            n_restarts=1,
            seed=batch_seed(keys),
            loss=self.loss,
            rho=self.rho,
        )
        return run_reseeding(attack, x, y)


@dataclass(frozen=True, kw_only=True)
class Square(robench.Attack):
    """Square Attack (Andriushchenko et al. 2020): query-based random search, via ``torchattacks.Square``.

    Distance measure: Linf or L2.
    Uses only the model's outputs, no gradients, so gradient masking does not fool it.

    BATCH-SEEDED: torchattacks draws every sample's squares from one seed for the whole
    batch (derived here from the batch's keys), so a sample's result depends on the batch it
    is attacked in (``batch_seeded = True``).

    Args:
        n_queries: queries per sample.
        p_init: initial fraction of pixels changed per query.
        loss: ``margin`` or ``ce`` (cross-entropy).
        restarts: number of restarts; each is a separate version.
    """

    name: ClassVar[str] = "square"
    norms: ClassVar[frozenset[Norm]] = frozenset({"linf", "l2"})
    batch_seeded: ClassVar[bool] = True
    score_based: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = False  # random search on the outputs alone
    n_queries: int = 5000
    p_init: float = 0.8
    loss: Literal["margin", "ce"] = "margin"
    restarts: int = 1

    def __post_init__(self) -> None:
        if self.n_queries < 1 or self.restarts < 1:
            raise ValueError("n_queries and restarts must be >= 1")
        if not 0 < self.p_init <= 1:
            raise ValueError("p_init must be in (0, 1]")

    def n_versions(self) -> int:
        """One version per restart."""
        return self.restarts

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, threat: robench.Threat, keys: Tensor) -> Tensor:
        """One Square run seeded from the batch's keys."""
        check_square_fits(x, threat)
        import torchattacks

        attack = torchattacks.Square(
            model,
            norm=_TA_NORM[threat.norm],
            eps=threat.eps,
            n_queries=self.n_queries,
            n_restarts=1,
            p_init=self.p_init,
            loss=self.loss,
            seed=batch_seed(keys),
        )
        return run_reseeding(attack, x, y)


@dataclass(frozen=True, kw_only=True)
class AutoAttack(robench.Attack):
    """AutoAttack (Croce & Hein 2020), standard version: APGD-CE, APGD-T, FAB-T, Square.

    Distance measure: Linf or L2.
    torchattacks' ``AutoAttack(version="standard")`` sequence: each attack runs on the
    samples the previous ones did not fool. The attacks are built here, as torchattacks
    builds them, only to pass ``steps``: torchattacks leaves APGD, APGD-T and FAB-T at their
    10-iteration defaults, whereas Croce & Hein's standard version runs 100. With
    ``steps=10`` it equals ``torchattacks.AutoAttack``. One version: AutoAttack is already a
    worst case over its attacks. The class count is read from the model's output.

    BATCH-SEEDED: all four attacks draw from one seed for the whole batch (derived here from
    the batch's keys), and each attacks the batch's survivors of the previous one, so a
    sample's result depends on the batch it is attacked in (``batch_seeded = True``).

    Args:
        steps: iterations of APGD-CE, APGD-T (per target class) and FAB-T.
        n_queries: queries per sample of Square.
    """

    name: ClassVar[str] = "autoattack"
    norms: ClassVar[frozenset[Norm]] = frozenset({"linf", "l2"})
    batch_seeded: ClassVar[bool] = True
    score_based: ClassVar[bool] = True  # its last stage is Square
    steps: int = 100
    n_queries: int = 5000

    def __post_init__(self) -> None:
        if self.steps < 1 or self.n_queries < 1:
            raise ValueError("steps and n_queries must be >= 1")

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, threat: robench.Threat, keys: Tensor) -> Tensor:
        """The four attacks in sequence, seeded from the batch's keys."""
        check_square_fits(x, threat)
        with torch.no_grad():
            n_classes = int(model(x[:1]).shape[1])
        common = {"norm": _TA_NORM[threat.norm], "eps": threat.eps, "seed": batch_seed(keys), "n_restarts": 1}
        import torchattacks
        from torchattacks.wrappers.multiattack import MultiAttack

        attack = MultiAttack(
            [
                torchattacks.APGD(model, **common, steps=self.steps, loss="ce"),
                torchattacks.APGDT(model, **common, steps=self.steps, n_classes=n_classes),
                torchattacks.FAB(model, **common, steps=self.steps, multi_targeted=True, n_classes=n_classes),
                torchattacks.Square(model, **common, n_queries=self.n_queries),
            ]
        )
        return run_reseeding(attack, x, y)


@robench.hookimpl
def robench_attacks() -> list[type[robench.Attack]]:
    """EOT-PGD, APGD, Square and AutoAttack."""
    return [EOTPGD, APGD, Square, AutoAttack]


__all__ = ["APGD", "EOTPGD", "AutoAttack", "Square", "batch_seed", "check_square_fits", "run_reseeding"]
