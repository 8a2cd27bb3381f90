"""INT8 quantization for the advft defense: a fake-quantised twin for training and
gradients, and the integer model it converts to for prediction.

Why torch.ao's FX graph mode and not torchao's pt2e flow: FX's ``convert_fx`` yields
modules that call torch's quantized CPU kernels (x86: fbgemm/oneDNN), so the deployed model
really computes in int8; pt2e's ``convert_pt2e`` yields a float graph with
quantize/dequantize pairs that only becomes integer code once lowered by ``torch.compile``,
and it needs the separate torchao package. FX is deprecated but present in the torch this
project pins (<= 2.14.1); its deprecation warning is silenced here, the one place robench
uses it.

Scheme (METHODS.md §3.4): weights symmetric per output channel (qint8, [-127, 127]),
activations asymmetric per tensor (quint8, the full [0, 255]), both from moving-average
min/max observers. The twin clamps exactly where the integer model clamps, so it stays
faithful on inputs (adversarial ones) that leave the calibrated range.

Why the QNNPACK engine and not x86's fbgemm/oneDNN (:data:`ENGINE`): the integer model must
compute the same function on every x86-64 CPU, and that function must be the twin's.
fbgemm's and oneDNN's u8 x s8 kernels on CPUs without VNNI (AVX2 only) multiply with
``vpmaddubsw``, which adds pairs of products in *saturating int16*: with full-range
activations two products of 255 x 127 overflow it, and the deployed model silently computes
something else than on a VNNI CPU (seen: logits 6.4 apart from the twin on an AVX2 EPYC,
under 0.05 on the AVX-512 machine earlier baselines came from). x86's usual fix, 7-bit
activations (``reduce_range``), only moves the problem: the converted model still quantizes
to [0, 255], so any activation past the calibrated maximum (which an attack produces, and a
moving-average observer leaves below the data's maximum) reaches the saturating range again
while the twin clamps at 127 (measured: 3.3 logits apart in range, 8 to 27 beyond).
QNNPACK's kernels accumulate in exact int32 and requantize with one float multiply and
round-to-nearest: no step of the arithmetic depends on the ISA (argued from the kernels;
measured on AVX2 only), and the logits differ from the twin's float simulation only where a
value falls within rounding of a quantization boundary (a step or two of the output scale).
The cost is speed: about 3x slower than fbgemm on cnn8 at batch 512; latency columns say so.

The twin is the model gradient attacks differentiate: ``torch.fake_quantize_*`` has a
straight-through gradient (identity inside the clamp range), so attacks see the integer
model's function without the zero gradients of rounding (METHODS.md §6.2).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.ao.quantization import (
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    disable_observer,
    enable_observer,
)
from torch.ao.quantization.backend_config import get_qnnpack_backend_config
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

from robench import ImageData, iterate, subset_indices

# The quantized engine every int8 model is converted for and run with (see the docstring),
# recorded in each quantized row's provenance (``quantized_engine``).
ENGINE = "qnnpack"


@contextmanager
def _fx() -> Iterator[None]:
    """Silence the FX flow's deprecation warning and select :data:`ENGINE`'s integer kernels."""
    torch.backends.quantized.engine = ENGINE
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated.*")
        yield


def qconfig_mapping() -> QConfigMapping:
    """The INT8 scheme above, applied to every quantizable layer."""
    activation = FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
    )
    weight = FakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver,
        quant_min=-127,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )
    return QConfigMapping().set_global(QConfig(activation=activation, weight=weight))


def fake_quantized(model: nn.Module, example: Tensor) -> nn.Module:
    """The fake-quantised twin of a float model ([0, 1] input, logits out), observers on.

    The float model is not changed. Its normalisation stays in float, before the first
    quantize step, as in the converted model.
    """
    with _fx():
        twin = prepare_qat_fx(
            copy.deepcopy(model).train(),
            qconfig_mapping(),
            (example.cpu(),),
            backend_config=get_qnnpack_backend_config(),
        )
    return twin.eval()


def freeze(twin: nn.Module) -> nn.Module:
    """Stop observing: scales and zero points stay fixed from now on (eval mode)."""
    twin.apply(disable_observer)
    return twin.eval()


def thaw(twin: nn.Module) -> nn.Module:
    """Observe again, e.g. while quantization-aware (fine-)tuning moves the weights."""
    twin.apply(enable_observer)
    return twin


@torch.no_grad()
def calibrate(twin: nn.Module, data: ImageData, n: int, seed: int, batch_size: int = 64) -> nn.Module:
    """Post-training calibration: observe ``n`` random training images, then freeze."""
    thaw(twin).eval()
    gen = torch.Generator().manual_seed(seed)
    device = next(twin.parameters()).device
    for x, _ in iterate(data, subset_indices(len(data), n, seed), batch_size, gen):
        twin(x.to(device))
    return freeze(twin)


def to_int8(twin: nn.Module) -> nn.Module:
    """The integer model of a frozen twin, runnable on any device (it computes on the CPU)."""
    with _fx():
        model = convert_fx(copy.deepcopy(freeze(twin)).cpu(), backend_config=get_qnnpack_backend_config())
    return CpuOnly(model)


class CpuOnly(nn.Module):
    """Runs a CPU-only model (torch's quantized kernels) for inputs on any device.

    The wrapped model is held outside the module tree, so ``.to(device)`` and
    ``.to(memory_format=...)`` calls made by the evaluator leave it on the CPU; inputs are
    copied there and logits copied back. It has no parameters of its own: count size and
    MACs on the twin.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.__dict__["inner"] = model

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the integer model, on ``x``'s device."""
        with _fx():
            out: Tensor = self.__dict__["inner"](x.detach().cpu().contiguous())
        return out.to(x.device)
