"""The dynamic ResNet: elastic width, depth and expand ratio (ProARD's ``DYNResNets_Cifar``; METHODS.md §4.2).

Structure, for an input of ``c`` channels (all 3x3 convs stride 1, BN + ReLU):

* stem: conv ``c -> m``, a residual block of two 3x3 convs ``m -> m`` (run only when the
  stem's depth choice is the largest), conv ``m -> s``, with ``m``, ``s`` the stem widths
  times the stem's width multiplier;
* stages of bottleneck blocks (1x1 reduce to ``width * e``, 3x3 with the stage's stride on
  the first block, 1x1 expand, conv shortcut on each stage's first block), ``base + d``
  blocks per stage, block widths ``stage width * w``;
* global average pooling, dropout (training only), a linear classifier.

Configuration dimensions: ``w`` (stem + one per stage), ``d`` (stem + one per stage: extra
blocks over the base depth), ``e`` (one per block of the largest network; the ratios of
blocks a shallower configuration skips are ignored).
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
    Normalize,
    make_divisible,
    permute_in,
    permute_out,
    static_bn,
    static_conv,
    static_linear,
)
from robench.plugins.proard.space import Config


@dataclass(frozen=True)
class ResNetSpace:
    """The sizes and elastic choices of a dynamic ResNet.

    :param stem: base widths of the stem's first conv and of its output
    :param widths: base output width of each stage
    :param base_depth: blocks per stage at depth offset 0
    :param strides: stride of each stage's first block
    :param width_choices: width multipliers
    :param depth_choices: extra blocks per stage
    :param expand_choices: bottleneck expand ratios (middle width / block width)
    :param divisor: channel counts are rounded to multiples of this (8 in the released code)
    """

    stem: tuple[int, int] = (32, 64)
    widths: tuple[int, ...] = (256, 512, 1024, 2048)
    base_depth: tuple[int, ...] = (2, 2, 4, 2)
    strides: tuple[int, ...] = (1, 2, 2, 2)
    width_choices: tuple[float, ...] = (0.65, 0.8, 1.0)
    depth_choices: tuple[int, ...] = (0, 1, 2)
    expand_choices: tuple[float, ...] = (0.2, 0.25, 0.35)
    divisor: int = 8

    def width(self, base: int, mult: float) -> int:
        """Channels of a layer of base width ``base`` at multiplier ``mult``."""
        return make_divisible(base * mult, self.divisor)


class _Bottleneck(nn.Module):
    """One dynamic bottleneck block; ``expand`` and the block width are set before each forward."""

    def __init__(self, space: ResNetSpace, max_in: int, max_out: int, stride: int, shortcut: bool) -> None:
        super().__init__()
        max_mid = make_divisible(max_out * max(space.expand_choices), space.divisor)
        self.space, self.stride = space, stride
        self.conv1, self.bn1 = DynamicConv2d(max_in, max_mid), DynamicBatchNorm2d(max_mid)
        self.conv2, self.bn2 = DynamicConv2d(max_mid, max_mid, (3,), stride), DynamicBatchNorm2d(max_mid)
        self.conv3, self.bn3 = DynamicConv2d(max_mid, max_out), DynamicBatchNorm2d(max_out)
        self.down = DynamicConv2d(max_in, max_out, (1,), stride) if shortcut else None
        self.down_bn = DynamicBatchNorm2d(max_out) if shortcut else None

    def configure(self, out: int, expand: float) -> None:
        """Set the block's output width and expand ratio."""
        self.conv1.active_out = self.conv2.active_out = make_divisible(out * expand, self.space.divisor)
        self.conv3.active_out = out
        if self.down is not None:
            self.down.active_out = out

    def forward(self, x: Tensor) -> Tensor:
        """relu(bottleneck(x) + shortcut(x))."""
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        skip = x if self.down is None or self.down_bn is None else self.down_bn(self.down(x))
        return F.relu(h + skip)

    def extract(self, in_channels: int) -> nn.Module:
        """The static block of the active configuration."""
        mid, out = self.conv1.active_out, self.conv3.active_out
        down = None
        if self.down is not None and self.down_bn is not None:
            down = nn.Sequential(static_conv(self.down, in_channels), static_bn(self.down_bn, out))
        return StaticResidual(
            nn.Sequential(
                static_conv(self.conv1, in_channels), static_bn(self.bn1, mid), nn.ReLU(),
                static_conv(self.conv2, mid), static_bn(self.bn2, mid), nn.ReLU(),
                static_conv(self.conv3, mid), static_bn(self.bn3, out),
            ),
            down,
        )  # fmt: skip

    @torch.no_grad()
    def reorganize(self) -> None:
        """Sort the middle channels by importance (L1 norm of the weights reading them), OFA's
        ``re_organize_middle_weights``: a smaller expand ratio then keeps the important ones."""
        for conv, bn, reader in ((self.conv2, self.bn2, self.conv3), (self.conv1, self.bn1, self.conv2)):
            order = reader.weight.abs().sum(dim=(0, 2, 3)).argsort(descending=True)
            permute_in(reader, order)
            permute_out(conv, bn, order)


class StaticResidual(nn.Module):
    """``relu(body(x) + shortcut(x))`` with plain layers (identity shortcut when ``down`` is None)."""

    def __init__(self, body: nn.Module, down: nn.Module | None) -> None:
        super().__init__()
        self.body, self.down = body, down

    def forward(self, x: Tensor) -> Tensor:
        """Residual sum, then ReLU."""
        return F.relu(self.body(x) + (x if self.down is None else self.down(x)))


class DynamicResNet(nn.Module):
    """A weight-shared ResNet family; :meth:`set_active` picks the subnet that forward computes."""

    family = "resnet"

    def __init__(self, space: ResNetSpace, shape: DataShape, dropout: float = 0.1) -> None:
        super().__init__()
        self.space, self.dropout = space, dropout
        wmax = max(space.width_choices)
        mid, out = space.width(space.stem[0], wmax), space.width(space.stem[1], wmax)
        self.normalize = Normalize(shape.mean, shape.std)
        self.stem_conv, self.stem_bn = DynamicConv2d(shape.channels, mid, (3,)), DynamicBatchNorm2d(mid)
        self.stem_block = nn.ModuleList([DynamicConv2d(mid, mid, (3,)), DynamicBatchNorm2d(mid)])
        self.stem_block.extend([DynamicConv2d(mid, mid, (3,)), DynamicBatchNorm2d(mid)])
        self.stem_out, self.stem_out_bn = DynamicConv2d(mid, out, (3,)), DynamicBatchNorm2d(out)
        self.stages = nn.ModuleList()
        max_in, dmax = out, max(space.depth_choices)
        for width, depth, stride in zip(space.widths, space.base_depth, space.strides, strict=True):
            max_out = space.width(width, wmax)
            blocks = [_Bottleneck(space, max_in if i == 0 else max_out, max_out, stride if i == 0 else 1, i == 0)
                      for i in range(depth + dmax)]  # fmt: skip
            self.stages.append(nn.ModuleList(blocks))
            max_in = max_out
        self.classifier = DynamicLinear(max_in, shape.num_classes)
        self.lengths = {"w": 1 + len(space.widths), "d": 1 + len(space.widths), "e": len(self.blocks())}
        self.choices = {
            "w": tuple(sorted(space.width_choices)),
            "d": tuple(float(d) for d in sorted(space.depth_choices)),
            "e": tuple(sorted(space.expand_choices)),
        }
        self.config: Config = {}
        self.set_active({dim: (values[-1],) * self.lengths[dim] for dim, values in self.choices.items()})

    def blocks(self) -> list[_Bottleneck]:
        """Every bottleneck block of the largest network, in order (positions of ``e``)."""
        return [block for stage in self.stages for block in stage]  # type: ignore[misc]

    def set_active(self, config: Config) -> None:
        """Make :meth:`forward` compute the subnet ``config``."""
        space = self.space
        mid, out = space.width(space.stem[0], config["w"][0]), space.width(space.stem[1], config["w"][0])
        self.stem_conv.active_out = mid
        self.stem_block[0].active_out = self.stem_block[2].active_out = mid
        self.stem_out.active_out = out
        if len(config["e"]) != self.lengths["e"]:
            raise ValueError(f"config has {len(config['e'])} expand ratios, the network {self.lengths['e']} blocks")
        expands = iter(config["e"])
        for stage, width, mult in zip(self.stages, space.widths, config["w"][1:], strict=True):
            for block in stage:
                block.configure(space.width(width, mult), next(expands))
        self.config = {dim: tuple(values) for dim, values in config.items()}

    def _stem_block_on(self) -> bool:
        return self.config["d"][0] == max(self.space.depth_choices)

    def _active_blocks(self) -> list[list[_Bottleneck]]:
        depths = [base + int(d) for base, d in zip(self.space.base_depth, self.config["d"][1:], strict=True)]
        return [list(stage)[:depth] for stage, depth in zip(self.stages, depths, strict=True)]  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the active subnet for [0, 1] inputs."""
        h = F.relu(self.stem_bn(self.stem_conv(self.normalize(x))))
        if self._stem_block_on():
            c1, b1, c2, b2 = self.stem_block
            h = F.relu(b2(c2(F.relu(b1(c1(h))))) + h)
        h = F.relu(self.stem_out_bn(self.stem_out(h)))
        for stage in self._active_blocks():
            for block in stage:
                h = block(h)
        h = F.dropout(F.adaptive_avg_pool2d(h, 1).flatten(1), self.dropout, self.training)
        out: Tensor = self.classifier(h)
        return out

    def extract(self) -> nn.Module:
        """The active subnet as a plain static network with copied weights (eval mode)."""
        channels = self.stem_conv.weight.shape[1]
        mid, out = self.stem_conv.active_out, self.stem_out.active_out
        layers: list[nn.Module] = [self.normalize, static_conv(self.stem_conv, channels)]
        layers += [static_bn(self.stem_bn, mid), nn.ReLU()]
        if self._stem_block_on():
            c1, b1, c2, b2 = self.stem_block
            body = nn.Sequential(static_conv(c1, mid), static_bn(b1, mid), nn.ReLU(), static_conv(c2, mid))
            layers.append(StaticResidual(body.append(static_bn(b2, mid)), None))
        layers += [static_conv(self.stem_out, mid), static_bn(self.stem_out_bn, out), nn.ReLU()]
        for stage in self._active_blocks():
            for block in stage:
                layers.append(block.extract(out))
                out = block.conv3.active_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), static_linear(self.classifier, out)]
        return _copy_normalize(nn.Sequential(*layers)).eval()

    def reorganize(self) -> None:
        """Sort every block's middle channels by importance (before expand-ratio shrinking)."""
        for block in self.blocks():
            block.reorganize()


def _copy_normalize(net: nn.Sequential) -> nn.Sequential:
    """Give the static net its own Normalize module (the dynamic net's must not be shared)."""
    first = net[0]
    assert isinstance(first, Normalize)
    net[0] = Normalize(tuple(first.mean.flatten().tolist()), tuple(first.std.flatten().tolist()))
    return net
