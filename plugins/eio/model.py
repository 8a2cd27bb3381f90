"""The random gated network (RGN) of Ensemble-in-One, built from any robench architecture.

EIO paper §3.2 and METHODS.md §2.1: every parameterised layer (a convolution, together with
the BatchNorm that follows it) is replaced by a *random gated block* (RGB) holding ``n``
candidate copies of it; a forward pass opens exactly one gate per block, chosen uniformly at
random, so a *path* (one choice per block) is an ordinary network of the original
architecture. Shortcut (1x1 downsample) convolutions and the linear classifier are not gated,
which gives 19 blocks for ResNet-20 (as in the paper) and 6 for cnn8.

Two forms, chosen by ``share_conv_weights``:

* paper form (default): every candidate has its own conv (+BN) weights ("repeated sub-layers
  are with different weight parameters", EIO §3.2);
* released-code form: the candidates of a block share one conv and differ only in their
  BatchNorm (METHODS.md §2.1, confirmed on the released checkpoint).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

GatePath = tuple[int, ...]
"""One gate choice per gated block, in forward order: a sub-network of the RGN."""

# A conv under one of these names is a residual shortcut (robench's convention: a residual
# block has ``residual`` and ``shortcut`` submodules); EIO leaves shortcuts ungated.
_SHORTCUT_NAMES = frozenset({"shortcut", "downsample"})
# Layer-l features are taken after the activation that follows gated block l (EIO's
# ``before_relu=False``, METHODS.md §2.2).
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh)


class Candidate(nn.Module):
    """One sub-layer of a gated block: a convolution and, if the original had one, its BN."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        """Conv, then BN when present."""
        out: Tensor = self.conv(x)
        return self.bn(out) if self.bn is not None else out


class GatedBlock(nn.Module):
    """A random gated block (EIO §3.2, Fig. 2b): ``n`` candidates, exactly one runs per forward.

    The owning :class:`RandomGatedNetwork` sets :attr:`active` before every forward pass, so
    only the chosen candidate's activations and gradients exist (the others stay untouched).

    :param candidates: the ``n`` sub-layers
    :param conv_name: qualified name of the replaced conv in the original network
    :param bn_name: qualified name of the BatchNorm folded into the block, or ``""``
    """

    def __init__(self, candidates: list[Candidate], conv_name: str, bn_name: str) -> None:
        super().__init__()
        self.paths = nn.ModuleList(candidates)
        self.conv_name, self.bn_name = conv_name, bn_name
        self.active = 0

    def forward(self, x: Tensor) -> Tensor:
        """Run the active candidate only."""
        out: Tensor = self.paths[self.active](x)
        return out


class _Captured(Exception):  # control flow, not an error
    """Raised by a hook to stop a forward pass once the wanted features exist."""


class RandomGatedNetwork(nn.Module):
    """A network whose gated blocks pick one candidate each per forward pass.

    Gates are drawn uniformly (EIO Eq. 1) from the network's own generator, seeded from the
    ``gate_seed`` buffer (saved with the weights) by :meth:`reseed`, unless a path is fixed
    with :meth:`set_path` or :meth:`using`.

    :param net: the original network with its gated convs replaced by :class:`GatedBlock`
    :param blocks: the gated blocks in forward order
    :param features: per block, the module whose output is that block's layer-l feature
        (the activation after it, or the block itself when none runs before the next block)
    """

    gate_seed: Tensor

    def __init__(self, net: nn.Module, blocks: list[GatedBlock], features: list[nn.Module]) -> None:
        super().__init__()
        self.net = net
        # Plain tuples, not ModuleLists: the modules are already registered under ``net`` and
        # must appear in the state dict once, under the names the derived network uses.
        self.blocks: tuple[GatedBlock, ...] = tuple(blocks)
        self.feature_modules: tuple[nn.Module, ...] = tuple(features)
        self.n_paths = len(blocks[0].paths)
        self.fixed: GatePath | None = None
        self.register_buffer("gate_seed", torch.tensor(0, dtype=torch.int64))
        self._gates = torch.Generator()
        self.reseed()

    @property
    def num_layers(self) -> int:
        """Distillation layers L: one per gated block, plus the logits (EIO Alg. 1)."""
        return len(self.blocks) + 1

    def reseed(self, seed: int | None = None) -> None:
        """Restart the random-gate stream (from ``gate_seed``, or from ``seed`` stored there)."""
        if seed is not None:
            self.gate_seed.fill_(seed)
        self._gates.manual_seed(int(self.gate_seed))

    def sample_path(self, gen: torch.Generator | None = None) -> GatePath:
        """A uniformly random path, drawn from ``gen`` (default: the network's gate stream)."""
        draw = torch.randint(0, self.n_paths, (len(self.blocks),), generator=gen or self._gates)
        return tuple(int(c) for c in draw.tolist())

    def check_path(self, path: GatePath) -> None:
        """Raise ValueError unless ``path`` has one valid choice per block."""
        if len(path) != len(self.blocks) or not all(0 <= c < self.n_paths for c in path):
            raise ValueError(f"a path needs {len(self.blocks)} choices in [0, {self.n_paths}), got {path}")

    def set_path(self, path: GatePath | None) -> None:
        """Fix every gate to ``path`` (``None``: random gates again)."""
        if path is not None:
            self.check_path(path)
        self.fixed = path

    @contextmanager
    def using(self, path: GatePath) -> Iterator[None]:
        """Fix the gates to ``path`` inside the block, then restore the previous setting."""
        saved = self.fixed
        self.set_path(path)
        try:
            yield
        finally:
            self.fixed = saved

    def forward(self, x: Tensor) -> Tensor:
        """Logits through the fixed path, or through freshly drawn random gates."""
        path = self.fixed if self.fixed is not None else self.sample_path()
        for block, choice in zip(self.blocks, path, strict=True):
            block.active = choice
        out: Tensor = self.net(x)
        return out

    def features(self, x: Tensor, layer: int) -> Tensor:
        """Layer-``layer`` features (1..L; L = logits), stopping the forward pass there."""
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer must be in 1..{self.num_layers}, got {layer}")
        if layer == self.num_layers:
            logits: Tensor = self(x)
            return logits
        block, wanted = self.blocks[layer - 1], self.feature_modules[layer - 1]
        captured: list[Tensor] = []
        armed = False

        def on_block(_m: nn.Module, _i: object, out: Tensor) -> None:
            nonlocal armed
            armed = True
            if wanted is block:
                captured.append(out)
                raise _Captured

        def on_feature(_m: nn.Module, _i: object, out: Tensor) -> None:
            if armed:  # a reused activation module may run before the block too
                captured.append(out)
                raise _Captured

        handles = [block.register_forward_hook(on_block)]
        if wanted is not block:
            handles.append(wanted.register_forward_hook(on_feature))
        try:
            self(x)
        except _Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if not captured:
            raise RuntimeError(f"layer {layer} features were never computed")
        return captured[0]


def build_rgn(
    new_model: Callable[[], nn.Module], n_paths: int, share_conv_weights: bool, example: Tensor
) -> RandomGatedNetwork:
    """The RGN of the architecture that ``new_model`` builds (EIO §3.2).

    Every candidate starts as a deep copy of the original layer: separate tensors (paper
    form) that begin equal and drift apart as different batches train different paths. The
    equal start matters for networks without BatchNorm such as cnn8: with independently
    initialised candidates, every block feeds its successor features from two unrelated
    weight sets, and the pre-training did not leave the initial loss plateau within the
    smoke budget. In the shared form every candidate reuses the original conv and gets its
    own copy of the BN.

    :param example: an input of the right shape (one sample suffices), to find the forward
        order of the gated blocks and the activation after each
    """
    net = new_model()
    sites = _gated_sites(net)
    if not sites:
        raise ValueError("the architecture has no convolution EIO can gate")
    if share_conv_weights and not all(bn for _, bn in sites):
        raise ValueError(
            "share_conv_weights=True needs a BatchNorm after every gated conv (the paths differ "
            "only in their BNs); this architecture has convs without one, so all paths would be equal"
        )
    gated = []
    for conv_name, bn_name in sites:
        conv = net.get_submodule(conv_name)
        bn = net.get_submodule(bn_name) if bn_name else None
        assert isinstance(conv, nn.Conv2d) and (bn is None or isinstance(bn, nn.BatchNorm2d))
        candidates = [
            Candidate(conv if share_conv_weights else copy.deepcopy(conv), copy.deepcopy(bn)) for _ in range(n_paths)
        ]
        block = GatedBlock(candidates, conv_name, bn_name)
        _replace(net, conv_name, block)
        if bn_name:
            _replace(net, bn_name, nn.Identity())  # the BN now lives inside each candidate
        gated.append(block)
    blocks, features = _forward_order(net, gated, example)
    return RandomGatedNetwork(net, blocks, features)


def derive(rgn: RandomGatedNetwork, path: GatePath, new_model: Callable[[], nn.Module]) -> nn.Module:
    """Roll ``path`` out as a plain network of the original architecture, without gates (EIO §3.4).

    The chosen candidates' conv weights and BN parameters and running statistics go back to
    the conv/BN they replaced (METHODS.md §6.4: per-path BN statistics travel with the path);
    every ungated tensor is copied as is. Loading is strict, so nothing is left at its init.
    """
    rgn.check_path(path)
    prefixes = tuple(f"{block.conv_name}." for block in rgn.blocks)
    state = {k: v for k, v in rgn.net.state_dict().items() if not k.startswith(prefixes)}
    for block, choice in zip(rgn.blocks, path, strict=True):
        candidate = block.paths[choice]
        assert isinstance(candidate, Candidate)
        state.update({f"{block.conv_name}.{k}": v for k, v in candidate.conv.state_dict().items()})
        if candidate.bn is not None:
            state.update({f"{block.bn_name}.{k}": v for k, v in candidate.bn.state_dict().items()})
    plain = new_model()
    plain.load_state_dict(state)
    return plain.to(next(rgn.parameters()).device)


def _gated_sites(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, name of the BN right after it in the same Sequential or ``""``) per gated conv."""
    sites = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or _SHORTCUT_NAMES & set(name.split(".")):
            continue
        parent_name, _, child = name.rpartition(".")
        sites.append((name, _following_bn(model.get_submodule(parent_name), child, module, parent_name)))
    return sites


def _following_bn(parent: nn.Module, child: str, conv: nn.Conv2d, parent_name: str) -> str:
    """The name of the BatchNorm2d directly after ``child`` in a Sequential ``parent``, or ``""``."""
    if not isinstance(parent, nn.Sequential):
        return ""  # outside a Sequential the forward order of siblings is unknown
    names = [n for n, _ in parent.named_children()]
    position = names.index(child)
    if position + 1 == len(names):
        return ""
    after = getattr(parent, names[position + 1])
    if not isinstance(after, nn.BatchNorm2d) or after.num_features != conv.out_channels:
        return ""
    return f"{parent_name}.{names[position + 1]}" if parent_name else names[position + 1]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _forward_order(
    net: nn.Module, blocks: list[GatedBlock], example: Tensor
) -> tuple[list[GatedBlock], list[nn.Module]]:
    """The blocks in the order a forward pass runs them, and the activation after each.

    Registration order usually is forward order, but nothing guarantees it for an arbitrary
    architecture, and both the gate prefixes and the distillation layers depend on it.
    """
    calls: list[nn.Module] = []
    watched = [*blocks, *(m for m in net.modules() if isinstance(m, _ACTIVATIONS))]
    handles = [m.register_forward_hook(lambda m, _i, _o: calls.append(m)) for m in watched]
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(example[:1])
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    order: list[GatedBlock] = []
    features: list[nn.Module] = []
    for module in calls:
        if isinstance(module, GatedBlock) and module not in order:
            order.append(module)
            features.append(module)
        elif not isinstance(module, GatedBlock) and order and features[-1] is order[-1]:
            features[-1] = module  # the first activation after the latest block
    missing = [b.conv_name for b in blocks if b not in order]
    if missing:
        raise ValueError(f"gated convs never run in a forward pass: {', '.join(missing)}")
    return order, features
