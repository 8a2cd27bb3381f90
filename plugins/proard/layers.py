"""Weight-shared dynamic layers and their static copies (OFA-style; METHODS.md §4.2).

A dynamic layer holds the weights of its largest form and computes with a slice of them:
the first ``c`` input channels (read from the input itself), the first ``active_out``
output channels and, for depthwise convolutions with elastic kernels, a kernel of size
``active_kernel`` derived from the largest one by OFA's kernel transform: the centre of the
next larger kernel, mapped by a learnt ``k² x k²`` matrix shared by all channels
(``KERNEL_TRANSFORM_MODE = 1`` of the released code; the matrices start as the identity).

``static_*`` functions copy the active slice into a plain ``nn.Conv2d`` / ``nn.BatchNorm2d``
/ ``nn.Linear``: the extracted student computes exactly what the dynamic layer computes
under that configuration, with no dynamic code left in it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robench


def make_divisible(value: float, divisor: int) -> int:
    """``value`` rounded to a multiple of ``divisor``, never more than 10 % below it (OFA/MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class DynamicConv2d(nn.Module):
    """A conv whose input channels follow the input, output channels ``active_out``, kernel ``active_kernel``.

    :param depthwise: one filter per input channel (``groups = channels``); then the output
        channel count is the input's and ``max_out`` must equal ``max_in``
    :param kernels: the kernel sizes it may run with, largest last; more than one only for
        depthwise convolutions (OFA's elastic kernel)
    """

    def __init__(
        self, max_in: int, max_out: int, kernels: tuple[int, ...] = (1,), stride: int = 1, depthwise: bool = False
    ) -> None:
        super().__init__()
        if len(kernels) > 1 and not depthwise:
            raise ValueError("elastic kernels are only defined for depthwise convolutions (OFA)")
        self.kernels = tuple(sorted(kernels))
        self.stride, self.depthwise = stride, depthwise
        k = self.kernels[-1]
        self.weight = nn.Parameter(torch.empty(max_out, 1 if depthwise else max_in, k, k))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        # one transform per step down, e.g. 7to5 and 5to3: a (k*k, k*k) matrix applied to every channel
        for big, small in zip(self.kernels[:0:-1], self.kernels[-2::-1], strict=True):
            self.register_parameter(f"transform_{big}to{small}", nn.Parameter(torch.eye(small * small)))
        self.active_out, self.active_kernel = max_out, k

    def active_weight(self, in_channels: int) -> Tensor:
        """The weight the layer computes with for an input of ``in_channels`` channels."""
        out = in_channels if self.depthwise else self.active_out
        weight = self.weight[:out] if self.depthwise else self.weight[:out, :in_channels]
        size = self.kernels[-1]
        for big, small in zip(self.kernels[:0:-1], self.kernels[-2::-1], strict=True):
            if size <= self.active_kernel:
                break
            start = (big - small) // 2
            centre = weight[:, :, start : start + small, start : start + small].reshape(-1, small * small)
            matrix = getattr(self, f"transform_{big}to{small}")
            weight = F.linear(centre, matrix).reshape(weight.shape[0], weight.shape[1], small, small)
            size = small
        return weight

    def forward(self, x: Tensor) -> Tensor:
        """Convolve with the active slice ('same' padding)."""
        weight = self.active_weight(x.shape[1])
        groups = x.shape[1] if self.depthwise else 1
        return F.conv2d(x, weight, None, self.stride, weight.shape[-1] // 2, 1, groups)


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first ``c`` channels of its largest form, ``c`` read from the input.

    The running statistics of the slice are updated in place, so subnets share (and pollute)
    them: every extracted student is recalibrated before evaluation (METHODS.md §4.6).
    """

    def forward(self, x: Tensor) -> Tensor:
        """Normalise with the first ``x.shape[1]`` channels' parameters and statistics."""
        c = x.shape[1]
        assert self.running_mean is not None and self.running_var is not None
        return F.batch_norm(
            x,
            self.running_mean[:c],
            self.running_var[:c],
            self.weight[:c],
            self.bias[:c],
            self.training,
            0.1 if self.momentum is None else self.momentum,
            self.eps,
        )


class DynamicLinear(nn.Linear):
    """A linear layer reading the first ``in`` features of its largest form (the classifier)."""

    def forward(self, x: Tensor) -> Tensor:
        """Apply the columns of the active input features."""
        return F.linear(x, self.weight[:, : x.shape[1]], self.bias)


Normalize = robench.Normalize  # normalisation inside the model, as every architecture has it


class HSwish(nn.Module):
    """``x * relu6(x + 3) / 6`` (MobileNetV3)."""

    def forward(self, x: Tensor) -> Tensor:
        """Apply h-swish."""
        return x * F.relu6(x + 3) / 6


class HSigmoid(nn.Module):
    """``relu6(x + 3) / 6`` (MobileNetV3's squeeze-and-excitation gate)."""

    def forward(self, x: Tensor) -> Tensor:
        """Apply h-sigmoid."""
        return F.relu6(x + 3) / 6


@torch.no_grad()
def static_conv(conv: DynamicConv2d, in_channels: int) -> nn.Conv2d:
    """A plain conv holding ``conv``'s active weight for ``in_channels`` inputs (kernel transform applied)."""
    weight = conv.active_weight(in_channels)
    out = weight.shape[0]
    k = weight.shape[-1]
    plain = nn.Conv2d(in_channels, out, k, conv.stride, k // 2, bias=False, groups=in_channels if conv.depthwise else 1)
    plain.weight.copy_(weight)
    return plain


@torch.no_grad()
def static_bn(bn: nn.BatchNorm2d, channels: int) -> nn.BatchNorm2d:
    """A plain BatchNorm with the first ``channels`` parameters and running statistics of ``bn``."""
    plain = nn.BatchNorm2d(channels, eps=bn.eps, momentum=bn.momentum)
    assert bn.running_mean is not None and bn.running_var is not None
    plain.weight.copy_(bn.weight[:channels])
    plain.bias.copy_(bn.bias[:channels])
    plain.running_mean.copy_(bn.running_mean[:channels])  # type: ignore[union-attr]
    plain.running_var.copy_(bn.running_var[:channels])  # type: ignore[union-attr]
    return plain


@torch.no_grad()
def static_linear(linear: nn.Linear, in_features: int) -> nn.Linear:
    """A plain linear layer with the first ``in_features`` columns of ``linear``."""
    plain = nn.Linear(in_features, linear.out_features, bias=linear.bias is not None)
    plain.weight.copy_(linear.weight[:, :in_features])
    if linear.bias is not None:
        plain.bias.copy_(linear.bias)
    return plain


@torch.no_grad()
def permute_out(conv: DynamicConv2d, bn: nn.BatchNorm2d, order: Tensor) -> None:
    """Reorder the output channels of ``conv`` and its BatchNorm (OFA's channel re-organisation)."""
    conv.weight.copy_(conv.weight[order])
    for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        assert tensor is not None
        tensor.copy_(tensor[order])


@torch.no_grad()
def permute_in(conv: DynamicConv2d, order: Tensor) -> None:
    """Reorder the input channels of ``conv`` (the consumer side of :func:`permute_out`)."""
    conv.weight.copy_(conv.weight[:, order])
