"""Tests for Adver-Fine's structured L1 filter pruning (robench.plugins.advft.prune)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from robench.architecture import make_model
from robench.execute.efficiency import measure
from robench.plugins.advft.prune import prune_filters, pruned_channels
from robench.plugins.architectures import CNN8, ResNet20
from robench.plugins.fashion_mnist import FashionMNIST
from robench.testing import CONFORMANCE_SHAPE, tiny_residual_model

SHAPE = FashionMNIST.shape
EXAMPLE = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))

# NNI keeps C - int(C * 0.8) filters: 32 -> 7, 64 -> 13, 128 -> 26.
CNN8_AT_08 = {"1.conv1": 7, "1.conv2": 7, "1.conv3": 13, "1.conv4": 13, "1.conv5": 26, "1.conv6": 26}


def cnn8(seed: int = 0) -> nn.Module:
    """A freshly initialised Fashion-MNIST cnn8 (with its Normalize), in eval mode."""
    torch.manual_seed(seed)
    return make_model(CNN8(), SHAPE).eval()


def resnet20(seed: int = 0) -> nn.Module:
    """A freshly initialised Fashion-MNIST ResNet-20, in eval mode."""
    torch.manual_seed(seed)
    return make_model(ResNet20(), SHAPE).eval()


def tiny_residual(seed: int = 0) -> nn.Module:
    """robench.testing's tiny residual net (16x16 inputs, 4 classes)."""
    return tiny_residual_model(seed=seed)


# Each builder with the side of its square grey inputs.
MODELS = [
    pytest.param(cnn8, 28, id="cnn8"),
    pytest.param(resnet20, 28, id="resnet20"),
    pytest.param(tiny_residual, CONFORMANCE_SHAPE.height, id="tiny-residual"),
]


def largest_filters(weight: torch.Tensor, n_keep: int) -> list[int]:
    """Indices of the ``n_keep`` filters with the largest L1 norm, in original order."""
    return sorted(torch.topk(weight.abs().flatten(1).sum(1), n_keep).indices.tolist())


def cnn8_params(widths: list[int], classes: int = 10) -> int:
    """cnn8's parameter count for conv widths ``widths`` (fc1 reads 4x4 maps of conv6)."""
    ins = [1, *widths[:-1]]
    convs = sum((c_in * 9 + 1) * c_out for c_in, c_out in zip(ins, widths, strict=True))
    return convs + (widths[-1] * 16 + 1) * 128 + (128 + 1) * classes


def cnn8_macs(widths: list[int], classes: int = 10) -> int:
    """cnn8's multiply-accumulates per 28x28 image (bias adds not counted, as torch's counter)."""
    ins, sides = [1, *widths[:-1]], [28, 14, 14, 7, 7, 4]
    convs = sum(s * s * c_out * c_in * 9 for s, c_in, c_out in zip(sides, ins, widths, strict=True))
    return convs + widths[-1] * 16 * 128 + 128 * classes


def test_cnn8_at_08_widths_size_and_cost() -> None:
    model = cnn8()
    before = measure(model, EXAMPLE, repeats=1)
    assert prune_filters(model, 0.8, EXAMPLE) is model
    after = measure(model, EXAMPLE, repeats=1)

    assert pruned_channels(model) == CNN8_AT_08
    # 549,994 -> 66,728 parameters; 13,686,528 -> 671,811 MACs per image.
    assert before.params == cnn8_params([32, 32, 64, 64, 128, 128]) == 549_994
    assert after.params == cnn8_params(list(CNN8_AT_08.values())) == 66_728
    assert before.macs == cnn8_macs([32, 32, 64, 64, 128, 128])
    assert after.macs == cnn8_macs(list(CNN8_AT_08.values())) == 671_811
    net = model[1]
    assert net.fc1.in_features == CNN8_AT_08["1.conv6"] * 16 == 416
    assert (net.fc1.out_features, net.fc2.in_features, net.fc2.out_features) == (128, 128, 10)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert not model.training


def test_keeps_the_largest_l1_filters_and_their_inputs() -> None:
    model = cnn8()
    net = model[1]
    with torch.no_grad():
        # conv1: filter i has every weight +-(rank_i + 1), so its L1 norm orders by rank_i.
        ranks = torch.randperm(32)
        signs = torch.where(torch.rand(32, 1, 3, 3) < 0.5, -1.0, 1.0)
        net.conv1.weight.copy_(signs * (ranks + 1.0).view(32, 1, 1, 1))
        # conv2: filters 0..6 are heavy only on conv1's pruned inputs. Ranked on the original
        # weights they are the 7 kept; ranked after conv1 is pruned they would not be.
        pruned_in = (ranks < 25).nonzero().view(-1)
        net.conv2.weight[:7, pruned_in] *= 100.0
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    keep = {f"conv{i}": largest_filters(original[f"1.conv{i}.weight"], n) for i, n in enumerate(CNN8_AT_08.values(), 1)}
    assert keep["conv1"] == sorted((ranks >= 25).nonzero().view(-1).tolist())
    assert keep["conv2"] == list(range(7))

    prune_filters(model, 0.8, EXAMPLE)

    torch.testing.assert_close(net.conv1.weight, original["1.conv1.weight"][keep["conv1"]], rtol=0, atol=0)
    torch.testing.assert_close(net.conv1.bias, original["1.conv1.bias"][keep["conv1"]], rtol=0, atol=0)
    conv2 = original["1.conv2.weight"][keep["conv2"]][:, keep["conv1"]]
    torch.testing.assert_close(net.conv2.weight, conv2, rtol=0, atol=0)
    # fc1 reads conv6's maps flattened channel-major: it keeps the 16 inputs of each kept channel.
    fc1 = original["1.fc1.weight"].view(128, 128, 16)[:, keep["conv6"]].reshape(128, -1)
    torch.testing.assert_close(net.fc1.weight, fc1, rtol=0, atol=0)
    torch.testing.assert_close(net.fc2.weight, original["1.fc2.weight"], rtol=0, atol=0)


def _zero_filters(model: nn.Module, sparsity: float) -> None:
    """Zero ``int(C * sparsity)`` random filters of every conv (and their BatchNorm entries).

    Convs of one width share the zeroed set, so channels coupled by a residual add are zero in
    every branch. Zero filters have the smallest L1 norm, so they are exactly the ones pruned.
    """
    chosen: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.BatchNorm2d):
                width = module.weight.shape[0]
                idxs = chosen.setdefault(width, torch.randperm(width)[: int(width * sparsity)])
                module.weight[idxs] = 0.0
                if module.bias is not None:
                    module.bias[idxs] = 0.0


@pytest.mark.parametrize(("build", "side"), MODELS)
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_pruning_zeroed_filters_preserves_the_function(
    build: Callable[[int], nn.Module], side: int, sparsity: float
) -> None:
    # If exactly the zeroed filters go, along with every input that read them, nothing changes.
    torch.manual_seed(2)
    model = build(0)
    _zero_filters(model, sparsity)
    x = torch.rand(4, 1, side, side)
    widths = pruned_channels(model)
    with torch.no_grad():
        expected = model(x)
    prune_filters(model, sparsity, x[:1])
    assert all(pruned_channels(model)[name] == w - int(w * sparsity) for name, w in widths.items())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("build", "sparsity"),
    [
        pytest.param(cnn8, 0.3, id="cnn8-0.3"),
        pytest.param(cnn8, 0.8, id="cnn8-0.8"),
        pytest.param(resnet20, 0.5, id="resnet20-0.5"),
    ],
)
def test_fresh_model_pruned_alike_is_a_skeleton(build: Callable[[int], nn.Module], sparsity: float) -> None:
    # The caller saves a pruned state_dict and later loads it into a fresh model pruned alike.
    trained, skeleton = build(0), build(1)
    prune_filters(trained, sparsity, EXAMPLE)
    prune_filters(skeleton, sparsity, EXAMPLE)
    assert pruned_channels(skeleton) == pruned_channels(trained)
    skeleton.load_state_dict(trained.state_dict(), strict=True)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(skeleton(x), trained(x), rtol=0, atol=0)


def test_residual_nets_prune_coupled_convs_together_and_still_run() -> None:
    tiny = tiny_residual()
    prune_filters(tiny, 0.5, torch.rand(1, 1, 16, 16))
    # The stem conv and the block's second conv meet at the residual add: one group, pruned alike.
    assert set(pruned_channels(tiny).values()) == {4}
    assert tiny(torch.rand(2, 1, 16, 16)).shape == (2, CONFORMANCE_SHAPE.num_classes)

    net = resnet20().train()
    prune_filters(net, 0.5, EXAMPLE)
    widths = pruned_channels(net)
    assert widths["1.stem.conv"] == 8 and net[1].fc.in_features == 32
    assert {w for name, w in widths.items() if ".stages.0." in name} == {8}
    assert {w for name, w in widths.items() if ".stages.1." in name} == {16}
    assert {w for name, w in widths.items() if ".stages.2." in name} == {32}
    assert all(module.training for module in net.modules())  # tracing's eval() was undone
    # Tracing ran in eval mode: no BatchNorm statistics were updated by the example.
    assert int(net[1].stem.bn.num_batches_tracked) == 0
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_frozen_model_under_no_grad_is_pruned_and_stays_frozen() -> None:
    model = cnn8().requires_grad_(False)
    with torch.no_grad():
        prune_filters(model, 0.8, EXAMPLE)
    assert pruned_channels(model) == CNN8_AT_08
    assert not any(param.requires_grad for param in model.parameters())


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, math.nan])
def test_sparsity_outside_unit_interval_is_refused(sparsity: float) -> None:
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        prune_filters(cnn8(), sparsity, EXAMPLE)


def test_sparsity_zero_changes_nothing() -> None:
    model = cnn8()
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert prune_filters(model, 0.0, EXAMPLE) is model
    assert pruned_channels(model) == dict(zip(CNN8_AT_08, [32, 32, 64, 64, 128, 128], strict=True))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name])
