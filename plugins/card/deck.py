"""CARD-Decks: ensembles of CARDs, averaged or spectrally gated (METHODS.md §5.1, §5.3).

``average`` is exactly RobustBench's ``Diffenderfer2021Winning_*_CARD_Deck`` forward: the
mean of the members' softmax, no gate [code]. ``spectral`` is a **reconstruction** of the
paper's gate from its abstract ("a gating module [that] dynamically select[s] appropriate
CARDs ... based on their spectral-similarity with test samples") and METHODS.md §5.3; no
public code of the gate exists. As reconstructed here:

1. each augmentation family has a Fourier signature: the mean magnitude of the centred 2-D
   DFT, per channel, over training images augmented with that family (:func:`signature`);
2. the incoming images get the same statistic (:func:`spectra`);
3. the distance to each family is the root-mean-square difference of the log magnitudes
   (``log(1e-3 + |F|)``: on a linear scale the few low-frequency bins, image content,
   would swamp the high-frequency bins where noise and blur differ);
4. the nearest family's cards are averaged as in ``average`` mode.

The paper gates a whole test batch. A batch-level gate makes a sample's prediction depend
on its batch-mates, which robench's evaluation forbids (DESIGN.md §5), so the default
``gate="sample"`` computes step 2 for each image alone: exactly the batch-level gate
applied to a batch of one, vectorised (each image's spectrum, distance and choice are its
own; the samples choosing one family run through that family's cards together, which gives
the same per-sample outputs as one call per image, up to float summation order).
``gate="batch"`` is the paper's form: its predictions depend on the batch, and the runner's
model checks flag it (``batch_dependent``).

Every deck returns log-probabilities, the log of the mean softmax (never probabilities:
cross-entropy and CW attacks need logits or their equivalent; METHODS.md §6.7), computed as
``logsumexp(log_softmax) - log k`` so that confident members do not underflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

DeckMode = Literal["average", "spectral"]
Gate = Literal["sample", "batch"]
LOG_FLOOR = 1e-3
"""Added to DFT magnitudes before the log (pixel units of [0, 1] images)."""


def spectra(x: Tensor) -> Tensor:
    """Centred 2-D DFT magnitude of each image and channel: (N, C, H, W)."""
    return torch.fft.fftshift(torch.fft.fft2(x.float(), norm="ortho"), dim=(-2, -1)).abs()


def signature(x: Tensor) -> Tensor:
    """The Fourier signature of a set of images: their mean DFT magnitude, (C, H, W)."""
    return spectra(x).mean(dim=0)


def distances(stats: Tensor, signatures: Tensor) -> Tensor:
    """RMS log-magnitude distance of each statistic (N, C, H, W) to each signature (F, C, H, W): (N, F)."""
    a = (stats + LOG_FLOOR).log().flatten(1)
    b = (signatures + LOG_FLOOR).log().flatten(1)
    return torch.cdist(a, b) / math.sqrt(a.shape[1])


def log_mean_softmax(cards: Sequence[nn.Module], x: Tensor) -> Tensor:
    """log(mean of the cards' softmax) on ``x``: the deck's average output."""
    logs = torch.stack([card(x).log_softmax(dim=1) for card in cards])
    return torch.logsumexp(logs, dim=0) - math.log(len(cards))


class CardDeck(nn.Module):
    """An ensemble of CARDs in ``average`` or ``spectral`` mode (module docstring).

    :param cards: the member models (logits out)
    :param families: the augmentation family index of each card (``spectral``)
    :param mode: ``average`` (RobustBench) or ``spectral`` (reconstructed gate)
    :param gate: ``sample`` (each image gated alone: batch-independent) or ``batch`` (the
        paper's batch-level gate: batch-dependent)
    :param signatures: each family's Fourier signature, (F, C, H, W), for ``spectral``; a
        buffer, so it is saved and reloaded with the cards
    """

    def __init__(
        self,
        cards: Sequence[nn.Module],
        families: Sequence[int],
        mode: DeckMode,
        gate: Gate = "sample",
        signatures: Tensor | None = None,
    ) -> None:
        super().__init__()
        if len(cards) != len(families):
            raise ValueError(f"{len(cards)} cards but {len(families)} family indices")
        if mode == "spectral" and signatures is None:
            raise ValueError("a spectral deck needs the families' signatures")
        self.cards = nn.ModuleList(cards)
        self.families = tuple(families)
        self.mode, self.gate = mode, gate
        self.register_buffer("signatures", signatures if signatures is not None else torch.zeros(0))

    def choose(self, x: Tensor) -> Tensor:
        """The family index the gate picks for each image of ``x``: (N,) int64."""
        with torch.no_grad():
            stats = spectra(x)
            if self.gate == "batch":
                stats = stats.mean(dim=0, keepdim=True)
            nearest = distances(stats, self.signatures.to(x.device)).argmin(dim=1)
        return nearest.expand(len(x)) if self.gate == "batch" else nearest

    def forward(self, x: Tensor) -> Tensor:
        """Log of the mean softmax of the cards (``average``) or of the gated family's cards."""
        if self.mode == "average" or len(x) == 0:
            return log_mean_softmax(list(self.cards), x)
        chosen = self.choose(x)
        out: Tensor | None = None
        for family in chosen.unique().tolist():
            members = [c for c, f in zip(self.cards, self.families, strict=True) if f == family]
            rows = (chosen == family).nonzero().squeeze(1)
            part = log_mean_softmax(members, x[rows])
            if out is None:
                out = part.new_zeros(len(x), part.shape[1])
            out = out.index_copy(0, rows, part)  # out of place: gradients flow to every part
        assert out is not None
        return out
