"""Built-in architectures: the networks the reproduced papers train and attack.

Every network takes *normalised* inputs of the dataset's shape and returns logits;
:func:`robench.architecture.make_model` prepends the normalisation. Each one adapts to the
dataset's channel count, image size and class count, so all of them run on both 1x28x28
Fashion-MNIST and 3x32x32 CIFAR.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

import robench
from robench import DataShape

# -- cnn8 ----------------------------------------------------------------------------

# Output width and stride of the six convs of Adver-Fine's EightLayerConv.
_CNN8_CONVS: tuple[tuple[int, int], ...] = ((32, 1), (32, 2), (64, 1), (64, 2), (128, 1), (128, 2))


def _conv_out(size: int, stride: int) -> int:
    """Spatial size after a 3x3 conv with padding 1 and the given stride."""
    return (size - 1) // stride + 1


def _cnn8(shape: DataShape) -> nn.Sequential:
    """EightLayerConv with named layers (``conv1``..``conv6``, ``fc1``, ``fc2``) for pruning."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels, height, width = shape.channels, shape.height, shape.width
    for i, (out, stride) in enumerate(_CNN8_CONVS, start=1):
        layers[f"conv{i}"] = nn.Conv2d(channels, out, 3, stride=stride, padding=1)
        layers[f"relu{i}"] = nn.ReLU()
        channels, height, width = out, _conv_out(height, stride), _conv_out(width, stride)
    # The flatten size follows the input: 128x4x4 = 2048 for both 28x28 and 32x32.
    layers["flatten"] = nn.Flatten()
    layers["fc1"] = nn.Linear(channels * height * width, 128)
    layers["relu7"] = nn.ReLU()
    layers["fc2"] = nn.Linear(128, shape.num_classes)
    return nn.Sequential(layers)


@dataclass(frozen=True, kw_only=True)
class CNN8(robench.Architecture):
    """Adver-Fine's 8-layer Fashion-MNIST CNN: 6 convs (3 strided), 2 FC, no BN (550k params).

    Layers are ``conv1``..``conv6`` (3x3, padding 1; widths 32, 32, 64, 64, 128, 128; stride 2
    on the even ones), each followed by ReLU, then ``fc1`` (128) and ``fc2`` (classes). No
    batch norm, pooling or dropout; PyTorch default init, as in the paper's ``model.py``.
    """

    name = "cnn8"

    def build(self, shape: DataShape) -> nn.Module:
        """A freshly initialised EightLayerConv for ``shape``."""
        return _cnn8(shape)


# -- CIFAR ResNets -----------------------------------------------------------------


def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 conv with padding 1 and no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """The CIFAR ResNet basic block: ``relu_out(residual(x) + shortcut(x))``.

    ``residual`` is ``conv1-bn1-relu1-conv2-bn2``; ``shortcut`` is the identity, or a 1x1
    conv + BN when the stride or the width changes (DVERGE's ResNet-20 shortcut).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # Two separate ReLU modules, unlike DVERGE's ResNet-20, which calls one module twice
        # (after bn1 and after the add). With one module a hook fires twice per block; with
        # two, SGM can hook the residual branch (``residual.relu1``) alone, and a hook on
        # ``relu_out`` fires exactly once.
        self.residual = nn.Sequential(
            OrderedDict(
                conv1=_conv3x3(in_planes, planes, stride),
                bn1=nn.BatchNorm2d(planes),
                relu1=nn.ReLU(),
                conv2=_conv3x3(planes, planes),
                bn2=nn.BatchNorm2d(planes),
            )
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(planes),
                )
            )
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Residual branch plus shortcut, then ReLU."""
        out: Tensor = self.relu_out(self.residual(x) + self.shortcut(x))
        return out


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dimensions, keeping (N, C, 1, 1).

    Not ``GlobalAvgPool()``: its CUDA backward uses atomic adds and is not
    deterministic, which would make attack gradients (and so verdicts) vary from run to run
    on GPUs. A mean's backward is a plain broadcast.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Average over H and W."""
        return x.mean(dim=(2, 3), keepdim=True)


class CifarResNet(nn.Module):
    """A CIFAR-style ResNet of :class:`BasicBlock` stages.

    3x3 stride-1 stem (conv-BN-ReLU, no max-pool), one stage per entry of ``widths`` (stride 2
    at the start of every stage but the first), global average pooling and a linear head.
    Global pooling (rather than DVERGE's fixed ``avg_pool2d(8)``) lets 28x28 inputs through.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int], blocks_per_stage: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict(
                conv=_conv3x3(in_channels, widths[0]),
                bn=nn.BatchNorm2d(widths[0]),
                relu=nn.ReLU(),
            )
        )
        stages: list[nn.Module] = []
        in_planes = widths[0]
        for i, planes in enumerate(widths):
            stages.append(_stage(in_planes, planes, blocks_per_stage, stride=1 if i == 0 else 2))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = GlobalAvgPool()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a normalised batch."""
        out: Tensor = self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))
        return out


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` BasicBlocks; only the first one strides and changes width."""
    first = BasicBlock(in_planes, planes, stride)
    return nn.Sequential(first, *(BasicBlock(planes, planes) for _ in range(blocks - 1)))


def _he_normal_(model: nn.Module) -> nn.Module:
    """He-normal (``kaiming_normal_``, fan-in) weights for every conv and linear layer.

    This is DVERGE's ``_weights_init``; biases and BatchNorm keep PyTorch's defaults.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(module.weight)
    return model


@dataclass(frozen=True, kw_only=True)
class ResNet20(robench.Architecture):
    """CIFAR ResNet-20 of DVERGE/EIO: 3 stages x 3 BasicBlocks, widths 16/32/64 (0.27M params).

    19 3x3 convs (stem + 2 per block; the ones EIO gates), 1x1 conv + BN shortcuts where the
    shape changes, global average pooling, fc 64→classes, He-normal init.
    """

    name = "resnet20"

    def build(self, shape: DataShape) -> nn.Module:
        """A freshly initialised ResNet-20 for ``shape``."""
        net = CifarResNet(shape.channels, shape.num_classes, (16, 32, 64), blocks_per_stage=3)
        return _he_normal_(net)


@dataclass(frozen=True, kw_only=True)
class ResNet18(robench.Architecture):
    """CIFAR-style ResNet-18: 3x3 stem, no max-pool, 4 stages x 2 BasicBlocks (11.2M params).

    Widths 64/128/256/512, global average pooling, linear head; the architecture of
    Adver-Fine's CIFAR-10 model (``resnet18_cifar10`` from ``detectors``). Init is the same
    He-normal as ResNet-20; the checkpoint's own training init (timm's) is not reproduced.
    """

    name = "resnet18"

    def build(self, shape: DataShape) -> nn.Module:
        """A freshly initialised ResNet-18 for ``shape``."""
        net = CifarResNet(shape.channels, shape.num_classes, (64, 128, 256, 512), blocks_per_stage=2)
        return _he_normal_(net)


# -- VGG-16 --------------------------------------------------------------------------

# Conv widths with "M" for 2x2 max-pooling: torchvision's configuration "D".
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


def _vgg_features(in_channels: int, height: int, width: int) -> nn.Sequential:
    """Conv-BN-ReLU layers (``conv1``..``conv13``) and the max-pools that still fit.

    A pool is skipped once it would shrink a side below 1 pixel: 28x28 inputs reach 1x1 after
    four pools (28→14→7→3→1), so the fifth is dropped; 32x32 inputs keep all five.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels, conv_index, pool_index = in_channels, 0, 0
    for item in _VGG16_CFG:
        if item == "M":
            if height // 2 >= 1 and width // 2 >= 1:
                pool_index += 1
                layers[f"pool{pool_index}"] = nn.MaxPool2d(2)
                height, width = height // 2, width // 2
            continue
        out = int(item)
        conv_index += 1
        layers[f"conv{conv_index}"] = nn.Conv2d(channels, out, 3, padding=1)
        layers[f"bn{conv_index}"] = nn.BatchNorm2d(out)
        layers[f"relu{conv_index}"] = nn.ReLU()
        channels = out
    return nn.Sequential(layers)


@dataclass(frozen=True, kw_only=True)
class VGG16(robench.Architecture):
    """VGG-16 with BatchNorm for small images: 13 conv-BN-ReLU, global pool, one linear head.

    Max-pools that would shrink the image below 1x1 are skipped, so 28x28 inputs work. The
    head is a single Linear(512, classes), as in EIO's VGG. PyTorch default init.
    """

    name = "vgg16"

    def build(self, shape: DataShape) -> nn.Module:
        """A freshly initialised VGG-16-BN for ``shape``."""
        return nn.Sequential(
            OrderedDict(
                features=_vgg_features(shape.channels, shape.height, shape.width),
                pool=GlobalAvgPool(),
                flatten=nn.Flatten(),
                fc=nn.Linear(512, shape.num_classes),
            )
        )


@robench.hookimpl
def robench_architectures() -> list[type[robench.Architecture]]:
    """Register the built-in architectures."""
    return [CNN8, ResNet20, VGG16, ResNet18]
