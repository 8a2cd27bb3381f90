"""Structured L1-norm filter pruning for Adver-Fine (METHODS §3.4), built on torch-pruning.

Adver-Fine prunes with NNI 3.0's ``L1NormPruner`` and then ``ModelSpeedup``; robench does the
same job with torch-pruning's :class:`~torch_pruning.DependencyGraph`, which removes a conv's
filters and, in the same step, the matching input slices of every layer that reads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import torch_pruning as tp  # type: ignore[import-untyped]  # ships no type hints

# torch_pruning is imported where it is used: it imports timm (and torchvision's models)
# when they are installed, seconds that `robench list` should not wait for.
from torch import nn


def prune_filters(model: nn.Module, sparsity: float, example: torch.Tensor) -> nn.Module:
    """Remove the ``sparsity`` fraction of smallest-L1 filters from every Conv2d, physically.

    NNI ``L1NormPruner`` semantics, per layer (not global): a conv with ``C`` filters loses
    ``int(C * sparsity)`` of them (NNI's floor of the *pruned* count, so it keeps
    ``C - int(C * sparsity)``; at 0.8 that is 32 -> 7, 64 -> 13, 128 -> 26), ranked by the L1
    norm of each filter's weights (bias excluded) in the *unpruned* model. The survivors keep
    their original order. Every dependent layer loses the matching inputs: the next conv's
    input channels, BatchNorm entries, and the groups of flattened inputs of the first Linear
    after a Flatten. No Linear loses outputs, so the classifier keeps all classes.

    Convs coupled by a residual add share their output channels, so torch-pruning prunes them
    as one group: the group's first conv (in traced order, e.g. the stem) picks the channels
    by its own filter norms and the others lose the same channels.

    The pruned widths depend only on the architecture and ``sparsity``, never on the weights,
    so a freshly built model pruned at the same sparsity is a skeleton that the pruned
    ``state_dict`` loads into.

    :param model: the network to prune, in place; train/eval modes and frozen parameters are kept
    :param sparsity: fraction of each conv's filters to remove, in [0, 1); 0 changes nothing
    :param example: a [0, 1] input batch on the model's device (e.g. 1x1x28x28), for tracing
    :returns: ``model``, pruned
    :raises ValueError: if ``sparsity`` is outside [0, 1)
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"sparsity must be in [0, 1): it is the fraction of each conv's filters to remove "
            f"(1 would remove them all), got {sparsity!r}"
        )
    if sparsity == 0.0:
        return model
    # Tracing switches the whole model to eval mode and leaves it there; restore each module.
    modes = {module: module.training for module in model.modules()}
    # Tracing sees no graph through frozen parameters (it would silently prune nothing), and
    # pruning replaces every pruned parameter by a new one that requires grad: unfreeze all
    # for the duration, then refreeze by name.
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    model.requires_grad_(True)
    try:
        graph = _trace(model, example)
        # Rank on the unpruned weights first: pruning conv1's outputs shrinks conv2's filters,
        # and NNI ranks every layer on the original model.
        plan = [(conv, _smallest_filters(conv, sparsity)) for conv in _group_roots(model, graph)]
        for conv, idxs in plan:
            if idxs:
                graph.get_pruning_group(conv, _tp().prune_conv_out_channels, idxs).prune()
    finally:
        for module, training in modes.items():
            module.training = training
        for name, param in model.named_parameters():
            param.requires_grad_(name not in frozen)
    return model


def pruned_channels(model: nn.Module) -> dict[str, int]:
    """Output-channel count of every Conv2d by module name (for tests, logs and skeleton checks)."""
    return {name: module.out_channels for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}


def _trace(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """The dependency graph of ``model`` on ``example`` (gradients on: tracing uses autograd)."""
    with torch.enable_grad():
        return _tp().DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)


def _group_roots(model: nn.Module, graph: tp.DependencyGraph) -> list[nn.Conv2d]:
    """The root conv of every conv-output pruning group, each coupled group once.

    Every Linear is ignored as a root: only conv outputs are pruned, and a Linear loses inputs
    only as a dependent of the conv before it.
    """
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    roots: list[nn.Conv2d] = []
    for group in graph.get_all_groups(ignored_layers=linears, root_module_types=[nn.Conv2d]):
        root = group[0].dep.target.module
        assert isinstance(root, nn.Conv2d)  # guaranteed by root_module_types
        roots.append(root)
    return roots


def _smallest_filters(conv: nn.Conv2d, sparsity: float) -> list[int]:
    """Indices of the ``int(out_channels * sparsity)`` filters with the smallest L1 norm.

    This is the conv's own filters only (NNI's metric); torch-pruning's default group
    importance would also count the next layer's input weights.
    """
    n_pruned = int(conv.out_channels * sparsity)
    norms = conv.weight.detach().abs().flatten(1).sum(dim=1)
    # Stable sort: ties (e.g. all-zero filters) go by index, so the result is deterministic.
    order = torch.argsort(norms, stable=True)
    return sorted(int(i) for i in order[:n_pruned])


def _tp() -> Any:
    """The torch_pruning module, imported on first use."""
    import torch_pruning

    return torch_pruning
