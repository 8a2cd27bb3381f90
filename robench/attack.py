"""The contract for attack plugins, and the per-sample random draws attacks must use."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robench.context import Norm, Threat
from robench.plugin import Plugin


@dataclass(frozen=True, kw_only=True)
class Attack(Plugin, ABC):
    """Base class for attacks. Subclasses are frozen, keyword-only dataclasses whose
    fields are the attack's parameters.

    An attack is run once per *version*: random restarts are versions, not loops inside
    :meth:`perturb`, so the runner can stop attacking a sample as soon as one version
    fooled it. :meth:`n_versions` says how many versions the attack contributes.
    """

    kind: ClassVar[str] = "attack"
    norms: ClassVar[frozenset[Norm]] = frozenset({"linf"})
    score_based: ClassVar[bool] = False
    """Whether the attack searches with the model's outputs alone, needing no gradient (Square),
    or runs such a search as one of its stages (AutoAttack). Gradient masking cannot fool
    it, so the model checks' masking diagnosis adds no Square version to a protocol using it."""
    needs_gradients: ClassVar[bool] = True
    """Whether the attack differentiates the model it attacks, in any stage (AutoAttack's APGD
    does; Square does not). A white-box version of such an attack is skipped, with the reason
    in the row, when the model checks find no gradient path through the evaluated model, since
    it could only fail with an autograd error there; the attacks that need no gradient still run."""

    def n_versions(self) -> int:
        """How many versions (independent restarts) this attack contributes to a protocol."""
        return 1

    @abstractmethod
    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, threat: Threat, keys: Tensor) -> Tensor:
        """Return adversarial inputs within ``threat`` of ``x`` and inside [0, 1].

        :param model: the differentiable model to attack, in eval mode, logits out
        :param x: clean inputs in [0, 1], NCHW
        :param y: true labels
        :param threat: norm and eps in pixel units
        :param keys: one int64 seed per sample; every random draw for sample ``i`` must come
            from ``keys[i]`` (see :func:`sample_uniform`), so results do not depend on
            batch size or on which other samples share the batch
        """


def derive_key(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (cell id, version, ...)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_keys(base: int, indices: Tensor) -> Tensor:
    """Per-sample seeds from a base key and the samples' dataset indices (int64, on CPU)."""
    # Knuth's multiplicative hash spreads neighbouring indices; the mask keeps 63 bits.
    return (indices.cpu().long() * 2654435761 + base) & ((1 << 62) - 1)


def sample_uniform(keys: Tensor, shape: torch.Size, low: float, high: float) -> Tensor:
    """One uniform draw of ``shape`` (per-sample shape) per key, stacked; on CPU.

    Written here because torchattacks draws random starts for a whole batch from the global
    generator, which makes a sample's start depend on its batch (DESIGN.md §5).
    """
    out = torch.empty((len(keys), *shape))
    gen = torch.Generator()
    for i, key in enumerate(keys.tolist()):
        gen.manual_seed(int(key))
        out[i].uniform_(low, high, generator=gen)
    return out


def sample_normal(keys: Tensor, shape: torch.Size) -> Tensor:
    """One standard-normal draw of ``shape`` per key, stacked; on CPU (see :func:`sample_uniform`)."""
    out = torch.empty((len(keys), *shape))
    gen = torch.Generator()
    for i, key in enumerate(keys.tolist()):
        gen.manual_seed(int(key))
        out[i].normal_(generator=gen)
    return out
