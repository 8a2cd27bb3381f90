"""CARD: compact, accurate and robust networks by lottery-ticket pruning, and CARD-Decks
(Diffenderfer et al., NeurIPS 2021; METHODS.md §5).

Each card is a network of the registered architecture trained with one augmentation family
(``augmix``: AugMix + JSD; ``gaussian``: Gaussian-noise augmentation; ``augment.py``) and
compressed by one ``method`` (``build.py``):

* ``lrr``: iterative magnitude pruning with learning-rate rewinding (the RobustBench CARDs);
* ``lth``: iterative magnitude pruning with weight rewinding to the initialisation;
* ``oneshot``: prune to the target once, then fine-tune (the paper's traditional baseline);
* ``dense``: no pruning (the unpruned model of the same family and schedule);
* ``biprop``: a binary-weight card, a pruned random network with +-alpha weights (``binary.py``).

Pruning is unstructured L1 magnitude pruning with ``torch.nn.utils.prune``, global over
every conv and linear weight or per layer (``scope``), to ``sparsity`` in ``rounds``
equal-ratio rounds (``prune.py``). The cards are cached with the masks folded in (exact
zeros), so the ``nonzero_params`` column is the real count; ``model_bytes`` is their size
in the ``bitmap-fp32`` encoding (1-bit occupancy bitmap per weight tensor plus the non-zero
fp32 values), or ``bitmap-sign`` for binary cards (bitmap, a sign bit per non-zero and one
fp32 scale per tensor); biases, normalisation and a deck's signatures count as dense fp32.
Dense cards report plain fp32 (``params * 4``).

Variants, each evaluated on its own: every card (``card-augmix``, ``card-gaussian``; with
``cards_per_family`` > 1, ``card-augmix-0``, ...), and with two cards or more the decks
(``deck.py``): ``deck-average`` (exactly RobustBench's mean of the cards' softmax) and, with
two families or more, ``deck-spectral`` (a documented reconstruction of the paper's Fourier
gate). Decks return log-probabilities. The spectral gate is applied to each image alone by
default (``gate="sample"``), so a sample's verdict never depends on its batch-mates;
``gate="batch"`` gates whole batches as the paper does, and the model checks flag it.

Presets (data, :data:`PRESETS`):

* ``paper`` (CIFAR-10/100, GPU): the RobustBench CARD architecture (``arch="card-lrr"``,
  RobustBench's ``Diffenderfer2021CARD``: ResNet-18 layout of width 128), AugMix and
  Gaussian cards at 95 % sparsity by LRR (RobustBench footnotes, METHODS.md §5.1), a deck
  of 3 + 3 cards (§5.1 [inferred]); the training schedule is the standard CIFAR one (160
  epochs, SGD lr 0.1, momentum 0.9, wd 5e-4, x0.1 at 50 % and 75 %) and 14 rounds of 20 %
  (Frankle & Carbin's and Renda et al.'s rate): [inferred], the paper's schedule is not
  public (METHODS.md §8). The field defaults are these values.
* ``smoke`` (Fashion-MNIST, the registered cnn8, 2 CPU cores): one card per family, 2000
  training images, batch 16 at a constant lr 0.05, 2 dense epochs and 3 rounds of 1 epoch
  to 95 %, one-shot fine-tuning at lr 0.005, 500 images per signature.
  ``robench run --defense card --protocol corruptions`` trains it and evaluates its 4
  variants in 5.8 min on the 2-core CPU beside one other job, 11 min beside four (2026-12-02;
  build 2.3 / 6.6 min, the rest the 75 corruption sets and their evaluation; identical numbers:
  clean / corruption accuracy card-augmix 73.1 / 70.8 %, card-gaussian 78.1 / 70.0 %,
  deck-average 77.4 / 73.0 %, deck-spectral 73.4 / 71.3 %, n = 1000). Evidence:
  benchmarks/card-fashion.toml and .md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

import robench
from robench import Schedule
from robench.plugins.card.augment import FAMILIES, Family
from robench.plugins.card.binary import BITMAP_FP32, BITMAP_SIGN, encoded_bytes
from robench.plugins.card.build import Method, Recipe, build_card, family_signature, fresh
from robench.plugins.card.deck import CardDeck, Gate
from robench.plugins.card.prune import Scope

__all__ = ["CARD", "PRESETS", "CardDeck"]

PRESETS: dict[str, dict[str, object]] = {
    # §5.1 (RobustBench CARD models) + [inferred] CIFAR schedule; these are the field defaults
    "paper": {"arch": "card-lrr", "cards_per_family": 3},
    # DESIGN.md §9: minutes on a 2-core CPU, the method's structure intact
    "smoke": {
        "epochs": 2,
        "round_epochs": 1,
        "rounds": 3,
        # cnn8 has no batch norm: from PyTorch's init it sits on a loss plateau for ~100 SGD
        # steps, so small batches (more steps per image) and a constant rate within 2 epochs
        "batch_size": 16,
        "lr": 0.05,
        "milestones": (),
        "weight_decay": 0.0,
        "finetune_lr": 0.005,  # one-shot FT at a tenth, where a decayed schedule would end
        "train_subset": 2000,
        "signature_images": 500,
    },
}
"""The presets, with their sources (module docstring)."""

_ZOO = {"card-lrr": "Diffenderfer2021Winning_LRR", "card-binary": "Diffenderfer2021Winning_Binary"}


@dataclass(frozen=True, kw_only=True)
class CARD(robench.Defense):
    """CARDs (lottery-ticket pruned, AugMix/Gaussian-trained) and CARD-Decks (Diffenderfer et al. 2021).

    Args:
        families: augmentation families, one group of cards each (``augmix``, ``gaussian``).
        cards_per_family: cards trained per family (different seeds).
        method: ``lrr``, ``lth``, ``oneshot``, ``dense`` or ``biprop`` (module docstring).
        sparsity: fraction of conv/linear weights removed (0 exactly for ``dense``).
        rounds: pruning rounds of ``lrr``/``lth`` (equal ratio each); one-shot fine-tunes
            for as many rounds' epochs.
        scope: ``global`` (one magnitude threshold over all layers) or ``layer``.
        epochs: dense training epochs (biprop: score-training epochs).
        round_epochs: retraining epochs per round (0 = ``epochs``).
        lr: initial learning rate; momentum, weight_decay, batch_size: SGD's.
        milestones: fractions of ``epochs`` after which the learning rate is multiplied by 0.1.
        finetune_lr: one-shot fine-tuning learning rate (0 = the dense schedule's final one).
        train_subset: train on this many random training images (0 = all).
        jsd_weight: weight of AugMix's Jensen-Shannon consistency loss.
        augmix_severity: AugMix severity.
        noise_sigma: largest standard deviation of the Gaussian-noise augmentation.
        deck: decks to add: ``both``, ``average``, ``spectral`` or ``none``.
        gate: spectral gate unit: ``sample`` (batch-independent) or ``batch`` (the paper's).
        signature_images: training images per family's Fourier signature.
        arch: ``registered`` (the cell's architecture) or RobustBench's CARD networks
            ``card-lrr`` / ``card-binary`` (3x32x32 data).
    """

    name: ClassVar[str] = "card"
    presets: ClassVar[dict[str, dict[str, object]]] = PRESETS
    families: tuple[Family, ...] = ("augmix", "gaussian")
    cards_per_family: int = 1
    method: Method = "lrr"
    sparsity: float = 0.95
    rounds: int = 14
    scope: Scope = "global"
    epochs: int = 160
    round_epochs: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    milestones: tuple[float, ...] = (0.5, 0.75)
    finetune_lr: float = 0.0
    train_subset: int = 0
    jsd_weight: float = 12.0
    augmix_severity: int = 3
    noise_sigma: float = 0.2
    deck: Literal["both", "average", "spectral", "none"] = "both"
    gate: Gate = "sample"
    signature_images: int = 1000
    arch: Literal["registered", "card-lrr", "card-binary"] = "registered"

    def __post_init__(self) -> None:
        if not self.families or len(set(self.families)) != len(self.families):
            raise ValueError(f"families must be distinct names from {FAMILIES}, got {self.families}")
        if (self.method == "dense") != (self.sparsity == 0):
            raise ValueError("method='dense' trains unpruned cards: use it with sparsity = 0 (and only it)")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if min(self.cards_per_family, self.rounds, self.epochs, self.batch_size) < 1 or self.round_epochs < 0:
            raise ValueError("cards_per_family, rounds, epochs and batch_size must be >= 1, round_epochs >= 0")
        if self.round_epochs > self.epochs:
            raise ValueError(f"round_epochs ({self.round_epochs}) cannot exceed epochs ({self.epochs})")
        if self.deck == "spectral" and len(self.families) < 2:
            raise ValueError("a spectral deck chooses between families: give two families or more")

    def card_names(self) -> list[tuple[str, Family, int]]:
        """(variant name, family, index) of every card."""
        many = self.cards_per_family > 1
        return [
            (f"card-{f}-{i}" if many else f"card-{f}", f, i)
            for f in self.families
            for i in range(self.cards_per_family)
        ]

    def deck_modes(self) -> list[Literal["average", "spectral"]]:
        """The decks this configuration adds (none with a single card)."""
        if len(self.card_names()) < 2 or self.deck == "none":
            return []
        modes: list[Literal["average", "spectral"]] = []
        if self.deck in ("both", "average"):
            modes.append("average")
        if self.deck in ("both", "spectral") and len(self.families) > 1:
            modes.append("spectral")
        return modes

    def variant_names(self) -> tuple[str, ...]:
        """Every card, then ``deck-average`` / ``deck-spectral``."""
        return (*(n for n, _, _ in self.card_names()), *(f"deck-{m}" for m in self.deck_modes()))

    def recipe(self) -> Recipe:
        """The per-card build recipe, schedules resolved."""
        dense = Schedule(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            milestones=tuple(sorted({round(f * self.epochs) for f in self.milestones} - {0})),
            train_subset=self.train_subset,
        )
        return Recipe(
            method=self.method,
            sparsity=self.sparsity,
            rounds=self.rounds,
            scope=self.scope,
            dense=dense,
            round_epochs=self.round_epochs or self.epochs,
            finetune_lr=self.finetune_lr,
            jsd_weight=self.jsd_weight,
            severity=self.augmix_severity,
            noise_sigma=self.noise_sigma,
        )

    def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """Build every card, then the decks from them."""
        recipe, ctx = self.recipe(), self._context(ctx)
        cards = {name: build_card(ctx, recipe, f, i, name) for name, f, i in self.card_names()}
        signatures = None
        if "spectral" in self.deck_modes():
            signatures = torch.stack([family_signature(ctx, recipe, f, self.signature_images) for f in self.families])
        return {**cards, **self._decks(list(cards.values()), signatures)}

    def skeletons(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """Fresh cards of the architecture and decks of them (signatures as zero buffers)."""
        ctx = self._context(ctx)
        cards = {name: fresh(ctx.new_model, 0) for name, _, _ in self.card_names()}
        shape = (len(self.families), ctx.shape.channels, ctx.shape.height, ctx.shape.width)
        return {**cards, **self._decks(list(cards.values()), torch.zeros(shape))}

    def variant(self, name: str, model: nn.Module) -> robench.Variant:
        """The model with its size in its encoding (module docstring)."""
        binary = self.method == "biprop"
        if self.method == "dense":
            return robench.Variant(name=name, model=model)
        encoding = BITMAP_SIGN if binary else BITMAP_FP32
        size = encoded_bytes(model, encoding)
        return robench.Variant(name=name, model=model, bits=1 if binary else 32, model_bytes=size, encoding=encoding)

    def _decks(self, cards: list[nn.Module], signatures: torch.Tensor | None) -> dict[str, nn.Module]:
        families = [self.families.index(f) for _, f, _ in self.card_names()]
        return {
            # the decks share the card modules (one copy of the weights in memory; the model
            # cache stores each variant's state on its own, and every load writes the same values)
            f"deck-{mode}": CardDeck(cards, families, mode, self.gate, signatures if mode == "spectral" else None)
            for mode in self.deck_modes()
        }

    def _context(self, ctx: robench.Context) -> robench.Context:
        """``ctx`` with RobustBench's CARD architecture as ``new_model`` when ``arch`` asks for it."""
        if self.arch == "registered":
            return ctx
        import dataclasses

        from robench.plugins.robustbench.compat import zoo_entry

        if (ctx.shape.channels, ctx.shape.height, ctx.shape.width) != (3, 32, 32):
            raise robench.ConfigError(f"arch={self.arch!r} is RobustBench's CIFAR network: it needs 3x32x32 data")
        dataset = ctx.dataset if ctx.dataset in ("cifar10", "cifar100") else "cifar10"
        make = zoo_entry(dataset, "corruptions", _ZOO[self.arch])["model"]
        return dataclasses.replace(ctx, new_model=make)


@robench.hookimpl
def robench_defenses() -> list[type[robench.Defense]]:
    """card."""
    return [CARD]
