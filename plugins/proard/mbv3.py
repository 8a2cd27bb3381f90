"""The dynamic MobileNetV3: elastic kernel, depth and expand ratio (ProARD's ``DYNMobileNetV3_Cifar``; METHODS.md §4.2).

Structure: a 3x3 conv (stride 1, h-swish), a fixed first block (depthwise 3x3 + project,
ReLU, identity shortcut), five stages of inverted-residual blocks (1x1 expand to
``in * e``, depthwise ``k x k`` with OFA's kernel transform, optional squeeze-and-excitation,
1x1 project; identity shortcut when shape allows), a 1x1 conv to ``final[0]`` (h-swish),
global pooling, a 1x1 conv to ``final[1]`` (h-swish), dropout, the classifier. Stages use
ReLU, ReLU, then h-swish; squeeze-and-excitation on stages 2, 4 and 5.

Configuration dimensions: ``k`` and ``e`` (one per block of the largest network), ``d``
(blocks per stage). Width is fixed, as in the released space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robench import DataShape
from robench.plugins.proard.layers import (
    DynamicBatchNorm2d,
    DynamicConv2d,
    DynamicLinear,
    HSigmoid,
    HSwish,
    Normalize,
    make_divisible,
    permute_in,
    permute_out,
    static_bn,
    static_conv,
    static_linear,
)
from robench.plugins.proard.space import Config

_ACTS = ("relu", "relu", "h_swish", "h_swish", "h_swish")
_SE = (False, True, False, True, True)


@dataclass(frozen=True)
class MobileNetSpace:
    """The sizes and elastic choices of a dynamic MobileNetV3 (five elastic stages).

    :param first: width of the first conv and the first block
    :param widths: output width of each stage
    :param strides: stride of each stage's first block
    :param final: widths of the last 1x1 conv and of the feature-mixing conv after pooling
    :param kernel_choices: depthwise kernel sizes
    :param expand_choices: expand ratios
    :param depth_choices: blocks per stage
    :param divisor: channel counts are rounded to multiples of this
    """

    first: int = 16
    widths: tuple[int, ...] = (24, 40, 80, 112, 160)
    strides: tuple[int, ...] = (1, 2, 2, 1, 2)
    final: tuple[int, int] = (960, 1280)
    kernel_choices: tuple[int, ...] = (3, 5, 7)
    expand_choices: tuple[float, ...] = (3, 4, 6)
    depth_choices: tuple[int, ...] = (2, 3, 4)
    divisor: int = 8


def _act(name: str) -> nn.Module:
    return nn.ReLU() if name == "relu" else HSwish()


class _SqueezeExcite(nn.Module):
    """Squeeze-and-excitation over the first ``c`` channels (reduction 4, biases, h-sigmoid gate)."""

    def __init__(self, max_channels: int, divisor: int) -> None:
        super().__init__()
        self.divisor = divisor
        red = make_divisible(max_channels / 4, divisor)
        self.reduce_w = nn.Parameter(torch.randn(red, max_channels) * max_channels**-0.5)
        self.reduce_b = nn.Parameter(torch.zeros(red))
        self.expand_w = nn.Parameter(torch.randn(max_channels, red) * red**-0.5)
        self.expand_b = nn.Parameter(torch.zeros(max_channels))

    def forward(self, x: Tensor) -> Tensor:
        """Gate the channels of ``x``."""
        c = x.shape[1]
        r = make_divisible(c / 4, self.divisor)
        s = F.relu(F.linear(x.mean((2, 3)), self.reduce_w[:r, :c], self.reduce_b[:r]))
        return x * F.relu6(F.linear(s, self.expand_w[:c, :r], self.expand_b[:c]) + 3)[:, :, None, None] / 6

    @torch.no_grad()
    def extract(self, c: int) -> nn.Module:
        """The static gate for ``c`` channels."""
        r = make_divisible(c / 4, self.divisor)
        reduce, expand = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)
        reduce.weight.copy_(self.reduce_w[:r, :c, None, None])
        reduce.bias.copy_(self.reduce_b[:r])
        expand.weight.copy_(self.expand_w[:c, :r, None, None])
        expand.bias.copy_(self.expand_b[:c])
        return StaticSE(nn.Sequential(nn.AdaptiveAvgPool2d(1), reduce, nn.ReLU(), expand, HSigmoid()))


class StaticSE(nn.Module):
    """``x * gate(x)`` with plain layers."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        """Gate the channels of ``x``."""
        return x * self.gate(x)


class StaticBlock(nn.Module):
    """``body(x) (+ x)`` with plain layers."""

    def __init__(self, body: nn.Module, residual: bool) -> None:
        super().__init__()
        self.body, self.residual = body, residual

    def forward(self, x: Tensor) -> Tensor:
        """The block's output."""
        out: Tensor = self.body(x)
        return out + x if self.residual else out


class _InvertedResidual(nn.Module):
    """One dynamic inverted-residual block; kernel and expand ratio are set before each forward."""

    def __init__(self, spec: MobileNetSpace, max_in: int, out: int, stride: int, act: str, se: bool) -> None:
        super().__init__()
        self.spec, self.act_name = spec, act
        max_mid = make_divisible(max_in * max(spec.expand_choices), spec.divisor)
        self.expand, self.bn1 = DynamicConv2d(max_in, max_mid), DynamicBatchNorm2d(max_mid)
        kernels = tuple(spec.kernel_choices)
        self.depthwise = DynamicConv2d(max_mid, max_mid, kernels, stride, depthwise=True)
        self.bn2 = DynamicBatchNorm2d(max_mid)
        self.se = _SqueezeExcite(max_mid, spec.divisor) if se else None
        self.project, self.bn3 = DynamicConv2d(max_mid, out), DynamicBatchNorm2d(out)
        self.act = _act(act)
        self.residual = stride == 1 and max_in == out

    def configure(self, in_channels: int, kernel: int, expand: float) -> None:
        """Set the kernel size and the middle width ``in * expand``."""
        self.expand.active_out = make_divisible(in_channels * expand, self.spec.divisor)
        self.depthwise.active_kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        """The block's output."""
        h = self.act(self.bn1(self.expand(x)))
        h = self.act(self.bn2(self.depthwise(h)))
        if self.se is not None:
            h = self.se(h)
        h = self.bn3(self.project(h))
        return h + x if self.residual else h

    def extract(self, in_channels: int) -> nn.Module:
        """The static block of the active configuration."""
        mid = self.expand.active_out
        layers = [static_conv(self.expand, in_channels), static_bn(self.bn1, mid), _act(self.act_name)]
        layers += [static_conv(self.depthwise, mid), static_bn(self.bn2, mid), _act(self.act_name)]
        if self.se is not None:
            layers.append(self.se.extract(mid))
        layers += [static_conv(self.project, mid), static_bn(self.bn3, self.project.active_out)]
        return StaticBlock(nn.Sequential(*layers), self.residual)

    @torch.no_grad()
    def reorganize(self) -> None:
        """Sort the middle channels by importance (L1 of the projection reading them; OFA)."""
        order = self.project.weight.abs().sum(dim=(0, 2, 3)).argsort(descending=True)
        permute_in(self.project, order)
        permute_out(self.depthwise, self.bn2, order)
        permute_out(self.expand, self.bn1, order)
        if self.se is not None:
            self.se.reduce_w.copy_(self.se.reduce_w[:, order])
            self.se.expand_w.copy_(self.se.expand_w[order])
            self.se.expand_b.copy_(self.se.expand_b[order])


class DynamicMobileNetV3(nn.Module):
    """A weight-shared MobileNetV3 family; :meth:`set_active` picks the subnet that forward computes."""

    family = "mbv3"

    def __init__(self, spec: MobileNetSpace, shape: DataShape, dropout: float = 0.1) -> None:
        super().__init__()
        self.space, self.dropout = spec, dropout
        f = spec.first
        self.normalize = Normalize(shape.mean, shape.std)
        self.first_conv, self.first_bn = DynamicConv2d(shape.channels, f, (3,)), DynamicBatchNorm2d(f)
        self.first_dw, self.first_dw_bn = DynamicConv2d(f, f, (3,), depthwise=True), DynamicBatchNorm2d(f)
        self.first_project, self.first_project_bn = DynamicConv2d(f, f), DynamicBatchNorm2d(f)
        self.stages = nn.ModuleList()
        max_in, dmax = f, max(spec.depth_choices)
        for width, stride, act, se in zip(spec.widths, spec.strides, _ACTS, _SE, strict=True):
            blocks = [_InvertedResidual(spec, max_in if i == 0 else width, width, stride if i == 0 else 1, act, se)
                      for i in range(dmax)]  # fmt: skip
            self.stages.append(nn.ModuleList(blocks))
            max_in = width
        self.final_conv, self.final_bn = DynamicConv2d(max_in, spec.final[0]), DynamicBatchNorm2d(spec.final[0])
        self.mix = DynamicConv2d(spec.final[0], spec.final[1])
        self.classifier = DynamicLinear(spec.final[1], shape.num_classes)
        n = len(spec.widths)
        self.lengths = {"k": n * dmax, "e": n * dmax, "d": n}
        self.choices = {
            "k": tuple(float(k) for k in sorted(spec.kernel_choices)),
            "e": tuple(float(e) for e in sorted(spec.expand_choices)),
            "d": tuple(float(d) for d in sorted(spec.depth_choices)),
        }
        self.config: Config = {}
        self.set_active({dim: (values[-1],) * self.lengths[dim] for dim, values in self.choices.items()})

    def blocks(self) -> list[_InvertedResidual]:
        """Every block of the largest network, in order (positions of ``k`` and ``e``)."""
        return [block for stage in self.stages for block in stage]  # type: ignore[misc]

    def set_active(self, config: Config) -> None:
        """Make :meth:`forward` compute the subnet ``config``."""
        if len(config["k"]) != self.lengths["k"] or len(config["e"]) != self.lengths["e"]:
            raise ValueError(f"config needs {self.lengths['k']} kernels and expand ratios")
        in_channels = self.space.first
        settings = iter(zip(config["k"], config["e"], strict=True))
        for stage, width in zip(self.stages, self.space.widths, strict=True):
            for i, block in enumerate(stage):
                kernel, expand = next(settings)
                block.configure(in_channels if i == 0 else width, int(kernel), expand)
            in_channels = width
        self.config = {dim: tuple(values) for dim, values in config.items()}

    def _active_blocks(self) -> list[_InvertedResidual]:
        return [
            block for stage, d in zip(self.stages, self.config["d"], strict=True) for block in list(stage)[: int(d)]
        ]

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the active subnet for [0, 1] inputs."""
        h = HSwish()(self.first_bn(self.first_conv(self.normalize(x))))
        h = h + self.first_project_bn(self.first_project(F.relu(self.first_dw_bn(self.first_dw(h)))))
        for block in self._active_blocks():
            h = block(h)
        h = HSwish()(self.final_bn(self.final_conv(h)))
        h = HSwish()(self.mix(F.adaptive_avg_pool2d(h, 1))).flatten(1)
        out: Tensor = self.classifier(F.dropout(h, self.dropout, self.training))
        return out

    def extract(self) -> nn.Module:
        """The active subnet as a plain static network with copied weights (eval mode)."""
        f, c = self.space.first, self.first_conv.weight.shape[1]
        mean, std = self.normalize.mean.flatten().tolist(), self.normalize.std.flatten().tolist()
        layers: list[nn.Module] = [Normalize(tuple(mean), tuple(std))]
        layers += [static_conv(self.first_conv, c), static_bn(self.first_bn, f), HSwish()]
        first = [static_conv(self.first_dw, f), static_bn(self.first_dw_bn, f), nn.ReLU()]
        first += [static_conv(self.first_project, f), static_bn(self.first_project_bn, f)]
        layers.append(StaticBlock(nn.Sequential(*first), True))
        channels = f
        for block in self._active_blocks():
            layers.append(block.extract(channels))
            channels = block.project.active_out
        final = self.space.final
        layers += [static_conv(self.final_conv, channels), static_bn(self.final_bn, final[0]), HSwish()]
        layers += [nn.AdaptiveAvgPool2d(1), static_conv(self.mix, final[0]), HSwish(), nn.Flatten()]
        layers.append(static_linear(self.classifier, final[1]))
        return nn.Sequential(*layers).eval()

    def reorganize(self) -> None:
        """Sort every block's middle channels by importance (before expand-ratio shrinking)."""
        for block in self.blocks():
            block.reorganize()
