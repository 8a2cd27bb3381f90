"""Tests for the built-in architectures: sizes, shapes, gradients, normalisation, seeding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import robench
from robench.architecture import Normalize, make_model
from robench.plugins.architectures import (
    CNN8,
    VGG16,
    BasicBlock,
    ResNet18,
    ResNet20,
    robench_architectures,
)

FMNIST = robench.DataShape(channels=1, height=28, width=28, num_classes=10, mean=(0.2860,), std=(0.3530,))
CIFAR10 = robench.DataShape(
    channels=3,
    height=32,
    width=32,
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2023, 0.1994, 0.2010),
)
CIFAR100 = robench.DataShape(
    channels=3,
    height=32,
    width=32,
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)
ARCHITECTURES = robench_architectures()
SHAPES = [pytest.param(FMNIST, id="1x28x28-10"), pytest.param(CIFAR100, id="3x32x32-100")]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _batch(shape: robench.DataShape, n: int = 2) -> torch.Tensor:
    return torch.randn(n, shape.channels, shape.height, shape.width)


def test_registration_names_and_summaries() -> None:
    names = [arch.name for arch in ARCHITECTURES]
    assert names == ["cnn8", "resnet20", "vgg16", "resnet18"]
    assert all(arch.summary() for arch in ARCHITECTURES)
    assert all(isinstance(arch.create(), robench.Architecture) for arch in ARCHITECTURES)


def test_cnn8_parameter_count_on_fashion_mnist() -> None:
    assert _count(CNN8().build(FMNIST)) == 549_994


def test_cnn8_layers_are_named_for_pruning() -> None:
    net = CNN8().build(FMNIST)
    convs = [name for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs == [f"conv{i}" for i in range(1, 7)]
    assert not any(isinstance(m, nn.BatchNorm2d | nn.MaxPool2d) for m in net.modules())


def test_resnet20_parameter_count_on_cifar10() -> None:
    assert _count(ResNet20().build(CIFAR10)) == 272_474


def test_resnet20_has_19_gated_convs_and_9_blocks() -> None:
    net = ResNet20().build(CIFAR10)
    kernels = [m.kernel_size for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert kernels.count((3, 3)) == 19  # EIO gates exactly these
    assert kernels.count((1, 1)) == 2  # the two downsampling shortcuts
    assert sum(isinstance(m, BasicBlock) for m in net.modules()) == 9


def test_basic_block_relus_are_separate_modules() -> None:
    block = BasicBlock(16, 32, stride=2)
    assert block.residual.relu1 is not block.relu_out
    assert isinstance(block.shortcut, nn.Sequential)
    assert isinstance(BasicBlock(16, 16).shortcut, nn.Identity)


def test_resnet18_parameter_count_on_cifar10() -> None:
    net = ResNet18().build(CIFAR10)
    assert _count(net) == 11_173_962
    assert sum(isinstance(m, BasicBlock) for m in net.modules()) == 8


@pytest.mark.parametrize(("shape", "pools"), [(FMNIST, 4), (CIFAR10, 5)])
def test_vgg16_skips_pools_that_do_not_fit(shape: robench.DataShape, pools: int) -> None:
    net = VGG16().build(shape)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == pools
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 13


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_logits_shape_and_input_gradient(arch: type[robench.Architecture], shape: robench.DataShape) -> None:
    net = arch().build(shape).eval()
    x = _batch(shape).requires_grad_()
    logits = net(x)
    assert logits.shape == (2, shape.num_classes)
    logits.sum().backward()
    assert x.grad is not None
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", [CNN8, ResNet20], ids=lambda a: a.name)
def test_make_model_normalises_first(arch: type[robench.Architecture]) -> None:
    model = make_model(arch(), CIFAR10).eval()
    first, net = model.children()
    assert isinstance(first, Normalize)
    mean = torch.tensor(CIFAR10.mean).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(mean), net(torch.zeros(2, 3, 32, 32)))


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_seed_controls_init(arch: type[robench.Architecture]) -> None:
    def weights(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [p.detach() for p in arch().build(FMNIST).parameters()]

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
