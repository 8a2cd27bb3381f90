"""Compressed + adversarial fine-tuning (Adver-Fine, arXiv 2403.09441; METHODS.md §3).

The defense takes a start model from the model cache (``baseline`` = the paper's f_std,
``advt`` = f_rob) or a fresh one (``scratch``, for quantization-aware training from
scratch), compresses it (structured L1 filter pruning, ``prune.py``; INT8 post-training
quantization or quantization-aware training, ``quant.py``) and fine-tunes it for a few
epochs on clean data (SFT) or on PGD examples (AFT).

Each configuration yields one variant, named in the paper's notation so rows can be
matched with its tables (METHODS.md §3.5): ``f_std``/``f_rob`` the start model,
``P(.)`` pruned, ``Q(.)`` PTQ-INT8, ``Q[QAT](.)`` quantization-aware trained, then
``+SFT``/``+AFT``. For example ``compression=prune, finetune=adversarial`` from
``baseline`` is ``P(f_std)+AFT``; Table 5's QAT row ("Q(f_rob) QAT", adversarial QAT from
scratch for 20 epochs) is ``start=scratch, compression=qat, finetune_epochs=20``:
``Q[QAT](f_init)+AFT``.

Quantized variants predict with the integer model and are attacked through its
fake-quantised twin (straight-through rounding), so robench reports no masked gradients
(METHODS.md §6.2).

Hyperparameters (METHODS.md §3.3-§3.4, recovered from the authors' code):

* fine-tuning: 3 epochs, batch 64; after pruning SGD lr 0.1 without momentum (paper A.1);
  after PTQ, for QAT and for the uncompressed model SGD lr 0.01 with momentum 0.9 (the NNI
  evaluator's optimizer; the uncompressed AFT schedule is not stated, so it gets the same);
* PGD (fine-tuning; the ``advft-pgd`` protocol evaluates with the same attack): 20 steps of
  eps/10, no random start. The paper's eps 0.1 is applied after Normalize(0.5, 0.5), so in
  pixel units it is 0.05 with steps of 0.005: set ``eps = 0.05`` to reproduce its numbers;
  0 takes the dataset's default eps (0.1 for Fashion-MNIST, the paper's stated value);
* pruning: sparsity 0.8 per conv layer (the paper's Fashion-MNIST level);
* PTQ: INT8, calibrated on 2000 random training images.

The ``smoke`` preset keeps the structure on a 2-core CPU budget: 1 fine-tuning epoch on
5000 images with 10-step PGD. ``robench run --defense advft --attack pgd`` (smoke baseline
start, then f_std+AFT) took 3 min 38 s on the 2-core CPU with another job running
(2026-11-26): 70.6 % clean, 54.4 % robust at eps 0.1 (PGD-20 x 5, n = 1000).
Fashion-MNIST reproduction: benchmarks/advft-fashion.toml and .md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

import robench
from robench import InputFn, Schedule, pgd_inputs, train
from robench.plugins.advft.prune import prune_filters
from robench.plugins.advft.quant import ENGINE, calibrate, fake_quantized, freeze, thaw, to_int8

__all__ = ["AdverFine"]

_START_NOTATION = {"baseline": "f_std", "advt": "f_rob", "scratch": "f_init"}
_COMPRESSION_NOTATION = {"none": "{}", "prune": "P({})", "ptq": "Q({})", "qat": "Q[QAT]({})"}
_FINETUNE_NOTATION = {"none": "", "standard": "+SFT", "adversarial": "+AFT"}


@dataclass(frozen=True, kw_only=True)
class AdverFine(robench.Defense):
    """Compress a trained model, then fine-tune it (standard or adversarial).

    Args:
        start: the model to compress: ``baseline`` (standard training), ``advt`` (PGD
            adversarial training at this defense's ``eps``), both from the model cache, or
            ``scratch`` (a fresh model; only with ``qat``).
        compression: ``none``, ``prune`` (structured L1 filter pruning), ``ptq`` (INT8
            post-training quantization) or ``qat`` (INT8 quantization-aware training).
        sparsity: fraction of filters removed from every conv layer (``prune``).
        bits: weight and activation bit width of ``ptq``/``qat``; only 8 (torch's integer
            kernels are int8).
        finetune: ``none``, ``standard`` (clean cross-entropy) or ``adversarial`` (PGD).
        finetune_epochs: fine-tuning epochs (the QAT training length for ``qat``).
        lr: fine-tuning learning rate; 0 picks the paper's (0.1 after pruning, else 0.01).
        momentum: SGD momentum; negative picks the paper's (0 after pruning, else 0.9).
        batch_size: fine-tuning batch size.
        train_subset: fine-tune on this many random training images (0 = all).
        eps: PGD radius of adversarial fine-tuning, pixel units; 0 = the dataset's default.
        attack_steps: PGD steps per fine-tuning batch.
        attack_step_size: PGD step as a fraction of eps.
        random_start: start PGD at a random point of the eps-ball.
        calibration_size: training images observed to calibrate PTQ.
    """

    name: ClassVar[str] = "advft"
    presets: ClassVar[dict[str, dict[str, object]]] = {
        "paper": {},
        "smoke": {"finetune_epochs": 1, "train_subset": 5000, "attack_steps": 10, "calibration_size": 1000},
    }
    start: Literal["baseline", "advt", "scratch"] = "baseline"
    compression: Literal["none", "prune", "ptq", "qat"] = "none"
    sparsity: float = 0.8
    bits: int = 8
    finetune: Literal["none", "standard", "adversarial"] = "adversarial"
    finetune_epochs: int = 3
    lr: float = 0.0
    momentum: float = -1.0
    batch_size: int = 64
    train_subset: int = 0
    eps: float = 0.0
    attack_steps: int = 20
    attack_step_size: float = 0.1
    random_start: bool = False
    calibration_size: int = 2000

    def __post_init__(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.bits != 8:
            raise ValueError(f"bits={self.bits}: only 8 is supported (torch's quantized CPU kernels are int8)")
        if self.start == "scratch" and self.compression != "qat":
            raise ValueError("start='scratch' trains from a fresh model: use it with compression='qat'")
        if self.compression == "qat" and (self.finetune == "none" or self.finetune_epochs < 1):
            raise ValueError("compression='qat' trains the model: set finetune and finetune_epochs >= 1")
        if self.finetune_epochs < 0 or self.batch_size < 1 or self.calibration_size < 1 or self.eps < 0:
            raise ValueError("finetune_epochs must be >= 0, batch_size and calibration_size >= 1, eps >= 0")

    @property
    def quantized(self) -> bool:
        """Whether the variant predicts with an integer model."""
        return self.compression in ("ptq", "qat")

    def model_revision(self) -> int:
        """Quantized models are at revision 2: QNNPACK kernels with full-range activations
        (quant.py) replaced x86's, whose int8 models differed by CPU. Other models: 1."""
        return 2 if self.quantized else 1

    def notation(self) -> str:
        """The variant's name in the paper's notation, e.g. ``P(f_std)+AFT``."""
        compressed = _COMPRESSION_NOTATION[self.compression].format(_START_NOTATION[self.start])
        return compressed + (_FINETUNE_NOTATION[self.finetune] if self.finetune_epochs else "")

    def variant_names(self) -> tuple[str, ...]:
        """One variant, named in the paper's notation."""
        return (self.notation(),)

    def schedule(self) -> Schedule:
        """The fine-tuning schedule (METHODS.md §3.4)."""
        pruned = self.compression == "prune"
        return Schedule(
            epochs=self.finetune_epochs,
            batch_size=self.batch_size,
            lr=self.lr or (0.1 if pruned else 0.01),
            momentum=self.momentum if self.momentum >= 0 else (0.0 if pruned else 0.9),
            train_subset=self.train_subset,
        )

    def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """Start model -> compression -> fine-tuning."""
        model = self._start_model(ctx)
        example = _example(ctx)
        if self.compression == "prune":
            model = prune_filters(model, self.sparsity, example)
        if self.quantized:
            model = fake_quantized(model, example)
            if self.compression == "ptq":
                model = calibrate(model, ctx.train, self.calibration_size, ctx.seed, self.batch_size)
        if self.finetune != "none" and self.finetune_epochs:
            if self.quantized:
                thaw(model)  # fine-tuning moves the weights: let the ranges follow
            model = train(model, ctx, self.schedule(), inputs=self._inputs(ctx), desc=f"{self.notation()} tune")
        if self.quantized:
            freeze(model)
        return {self.notation(): model.cpu()}

    def skeletons(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """A fresh model with the fitted one's shapes: pruned (shapes depend only on the
        architecture and the sparsity) and/or wrapped with fake-quant modules."""
        model, example = ctx.new_model(), _example(ctx)
        if self.compression == "prune":
            model = prune_filters(model, self.sparsity, example)
        if self.quantized:
            model = fake_quantized(model, example)
        return {self.notation(): model}

    def variant(self, name: str, model: nn.Module) -> robench.Variant:
        """Quantized variants predict in int8 and are attacked through their twin."""
        if not self.quantized:
            return robench.Variant(name=name, model=model)
        twin = freeze(model)
        return robench.Variant(name=name, model=to_int8(twin), grad_model=twin, bits=self.bits, quantized_engine=ENGINE)

    def requires(self) -> tuple[robench.PluginSpec, ...]:
        """The start model's defense (``baseline`` or ``advt``), unless it starts from scratch."""
        return () if self.start == "scratch" else (robench.PluginSpec.of(self.start, self._start_params()),)

    def _start_params(self) -> dict[str, object]:
        return {"eps": self.eps} if self.start == "advt" and self.eps else {}

    def _start_model(self, ctx: robench.Context) -> nn.Module:
        if self.start == "scratch":
            return ctx.new_model()
        if ctx.get_models is None:
            raise RuntimeError("advft needs the runner's model cache (Context.get_models) for its start model")
        (parent,) = ctx.get_models(self.start, self._start_params()).values()
        return copy.deepcopy(parent).cpu().eval()

    def _inputs(self, ctx: robench.Context) -> InputFn | None:
        if self.finetune != "adversarial":
            return None
        eps = self.eps or ctx.default_eps
        return pgd_inputs(eps, self.attack_steps, self.attack_step_size, random_start=self.random_start)


def _example(ctx: robench.Context) -> torch.Tensor:
    """Two training images, for tracing the network (pruning, quantization)."""
    return ctx.train.batch(torch.arange(2))[0]


@robench.hookimpl
def robench_defenses() -> list[type[robench.Defense]]:
    """advft."""
    return [AdverFine]
