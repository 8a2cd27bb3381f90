"""Model efficiency facts for the results table: size, sparsity, MACs, latency."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Efficiency:
    """Size and cost of one model."""

    params: int
    nonzero_params: int
    bits: int
    model_bytes: int
    macs: int
    latency_ms: float


def measure(
    model: nn.Module,
    example: torch.Tensor,
    bits: int = 32,
    repeats: int = 10,
    counted: nn.Module | None = None,
    model_bytes: int = 0,
) -> Efficiency:
    """Count parameters and MACs, and time single-image inference on ``example``'s device.

    MACs come from torch's own FLOP counter (FLOPs / 2), so no hand-written per-layer table.
    ``counted`` is the model whose parameters and MACs are counted when ``model`` hides them
    (an int8 model keeps its weights packed, and its quantized kernels are invisible to the
    FLOP counter): its float or fake-quantised twin, with the same layers. Latency is always
    that of ``model``; ``bytes`` is parameters x ``bits`` / 8, unless the variant states its
    size in a sparse or bit-packed encoding (``model_bytes`` > 0, :class:`robench.Variant`).
    """
    counted = model if counted is None else counted
    tensors = [p for p in counted.parameters()]
    params = sum(p.numel() for p in tensors)
    nonzero = sum(int(torch.count_nonzero(p)) for p in tensors)
    one = example[:1]
    # Counted with autograd on: the FLOP counter's module tracker hooks every module input
    # that requires grad (a fake-quant twin feeds its weights through modules), which fails
    # under inference mode. One image, no backward: the graph is dropped at once.
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        counted(one)
    macs = counter.get_total_flops() // 2
    with torch.inference_mode():
        model(one)  # warm-up
        times = []
        for _ in range(repeats):
            if one.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(one)
            if one.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    size = model_bytes or params * bits // 8
    return Efficiency(params, nonzero, bits, size, int(macs), 1000 * statistics.median(times))
