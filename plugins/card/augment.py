"""The CARD paper's training augmentations, as losses for :func:`robench.train` (METHODS.md §5.2).

* ``augmix``: torchvision's :class:`~torchvision.transforms.AugMix` with the Jensen-Shannon
  consistency loss of Hendrycks et al. (2020): cross-entropy on the clean images plus
  ``jsd_weight`` (12 in the AugMix paper) times the JSD between the predictions on the
  clean image and two independent AugMix views. ``all_ops=False``: AugMix's own operation
  set, which leaves out the operations that overlap the test corruptions (brightness,
  contrast, colour, sharpness), as the AugMix paper requires.
* ``gaussian``: Gaussian-noise augmentation: each image gets noise of a standard deviation
  drawn uniformly from ``[0, noise_sigma]`` (so the model also sees near-clean images),
  clipped to [0, 1], then plain cross-entropy.

AugMix is applied per image, each with its own operations: torchvision draws one chain of
operations per call (only the mixing weights are per image), so a batch in one call would
share its operations. Its draws come from torch's global generator; each loss holds a
generator of its own and reseeds the global one from it, per image, inside
``torch.random.fork_rng``: the augmentation depends only on that generator (checkpointed
by :func:`robench.train`, via :class:`robench.Stateful`), not on whatever else in the
process draws from the global one. Images go to AugMix as uint8 (the loop's floats are
uint8 / 255 exactly): its posterize, equalize and solarize operations are defined on uint8.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Family = Literal["augmix", "gaussian"]
FAMILIES: tuple[Family, ...] = ("augmix", "gaussian")
"""Augmentation families, in a fixed order (card seeds derive from the position)."""


class FamilyLoss:
    """The training loss of one augmentation family; a :class:`robench.Stateful` callback.

    :param family: ``augmix`` (AugMix + JSD) or ``gaussian`` (Gaussian-noise augmentation)
    :param seed: seeds the loss's own generator (augmentation draws)
    :param jsd_weight: weight of the JSD consistency term (``augmix``)
    :param severity: AugMix severity (1-10; torchvision's and the AugMix paper's default 3)
    :param noise_sigma: largest noise standard deviation (``gaussian``), pixel units
    """

    def __init__(
        self, family: Family, seed: int, *, jsd_weight: float = 12.0, severity: int = 3, noise_sigma: float = 0.2
    ) -> None:
        self.family, self.seed = family, seed
        self.jsd_weight, self.severity, self.noise_sigma = jsd_weight, severity, noise_sigma
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The batch loss of ``model`` on clean images ``x`` with labels ``y``."""
        if self.family == "gaussian":
            return F.cross_entropy(model(self.augment(x)), y)
        view1, view2 = self.augment(x), self.augment(x)
        logits = model(torch.cat([x, view1, view2]))
        clean, aug1, aug2 = logits.float().chunk(3)
        return F.cross_entropy(clean, y) + self.jsd_weight * jensen_shannon(clean, aug1, aug2)

    def augment(self, x: Tensor) -> Tensor:
        """One augmented view of the [0, 1] batch ``x`` (same device), drawn from the loss's generator."""
        if self.family == "gaussian":
            sigma = torch.rand(len(x), 1, 1, 1, generator=self.gen) * self.noise_sigma
            noise = torch.randn(x.shape, generator=self.gen) * sigma
            return (x + noise.to(x.device)).clamp(0.0, 1.0)
        return augmix(x, self.gen, self.severity)

    def identity(self) -> dict[str, object]:
        """Parameters that determine the loss (see :class:`robench.Stateful`)."""
        return {
            "kind": f"card-{self.family}",
            "seed": self.seed,
            "jsd_weight": self.jsd_weight if self.family == "augmix" else 0.0,
            "severity": self.severity if self.family == "augmix" else 0,
            "noise_sigma": self.noise_sigma if self.family == "gaussian" else 0.0,
        }

    def state_dict(self) -> dict[str, Any]:
        """The generator's state."""
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator's state."""
        self.gen.set_state(state["gen"])


def augmix(x: Tensor, gen: torch.Generator, severity: int = 3) -> Tensor:
    """AugMix (torchvision, ``all_ops=False``) applied to each image of the [0, 1] batch ``x``
    with its own operations; every draw comes from ``gen`` (see the module docstring)."""
    from torchvision.transforms import AugMix  # here: torchvision's import costs a second

    transform = AugMix(severity=severity, all_ops=False)
    images = (x.detach().cpu() * 255).round().to(torch.uint8)
    seeds = torch.randint(0, 2**62, (len(x),), generator=gen).tolist()
    out = torch.empty_like(images)
    with torch.random.fork_rng(devices=[]):
        for i, seed in enumerate(seeds):
            torch.manual_seed(seed)
            out[i] = transform(images[i])
    return out.to(x.device).float().div_(255)


def jensen_shannon(*logits: Tensor) -> Tensor:
    """The Jensen-Shannon divergence between the softmax of each logit tensor (AugMix's
    form: the mean KL of each distribution from their mixture, the mixture clamped at 1e-7)."""
    probs = [z.softmax(dim=1) for z in logits]
    mixture = torch.clamp(torch.stack(probs).mean(dim=0), 1e-7, 1.0).log()
    return torch.stack([F.kl_div(mixture, p, reduction="batchmean") for p in probs]).mean()
