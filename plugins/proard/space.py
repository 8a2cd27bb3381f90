"""Configurations of a dynamic network, the progressive-shrinking stages, and the student module.

A configuration maps each elastic dimension to one choice per position, e.g. for the
dynamic ResNet ``{"w": (1.0, 0.8, ...), "d": (2, 0, ...), "e": (0.35, 0.2, ...)}``: a width
multiplier for the stem and each stage, a depth offset for the stem block and each stage,
an expand ratio for each block. It is plain JSON data, so it is stored with the student
(:class:`Student`) and in the results table.

Progressive shrinking (METHODS.md §4.4) enables more choices of one dimension at a time,
starting from the largest: width (kernel for MobileNetV3), then depth, then expansion,
each in two phases (the two largest values, then all). :func:`stage_spaces` gives, per
stage, the choices enabled in every dimension; the ``random`` ablation enables the whole
space in every stage.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

Config = dict[str, tuple[float, ...]]
"""Dimension -> one choice per position (ints are stored as floats-compatible numbers)."""

Choices = Mapping[str, tuple[float, ...]]
"""Dimension -> the choices enabled (sorted ascending)."""

STAGES = ("width", "depth-1", "depth-2", "expand-1", "expand-2")
"""The progressive-shrinking stages of the released code, in order (METHODS.md §4.4)."""


def first_dimension(choices: Choices) -> str:
    """The dimension stage 1 shrinks: width (``w``) for ResNets, kernel (``k``) for MobileNetV3."""
    return "w" if "w" in choices else "k"


def stage_spaces(choices: Choices, random: bool = False) -> list[dict[str, tuple[float, ...]]]:
    """The choices enabled in each of :data:`STAGES`.

    Stage 1 enables every value of the first dimension with depth and expansion at their
    largest; depth-1 adds the two largest depths, depth-2 all; expand-1 and expand-2 do the
    same for the expand ratio. Each stage keeps what earlier stages enabled. With
    ``random``, every stage samples the whole space (the no-progressive-schedule ablation).
    """
    full = {dim: tuple(sorted(values)) for dim, values in choices.items()}
    if random:
        return [dict(full) for _ in STAGES]
    largest = {dim: values[-1:] for dim, values in full.items()}
    first = first_dimension(full)
    spaces, current = [], dict(largest)
    for stage in STAGES:
        dim = {"width": first, "depth": "d", "expand": "e"}[stage.split("-")[0]]
        current[dim] = full[dim][-2:] if stage.endswith("-1") else full[dim]
        spaces.append(dict(current))
    return spaces


def sample_config(lengths: Mapping[str, int], enabled: Choices, gen: torch.Generator) -> Config:
    """A configuration drawn uniformly: each position of each dimension picks one enabled value."""
    config: Config = {}
    for dim in sorted(lengths):
        values = enabled[dim]
        picks = torch.randint(0, len(values), (lengths[dim],), generator=gen).tolist()
        config[dim] = tuple(values[i] for i in picks)
    return config


def extreme_config(lengths: Mapping[str, int], choices: Choices, largest: bool) -> Config:
    """The largest (or smallest) configuration: every position at its largest (smallest) value."""
    pick = max if largest else min
    return {dim: (pick(choices[dim]),) * lengths[dim] for dim in sorted(lengths)}


def encode(config: Mapping[str, tuple[float, ...]]) -> str:
    """Canonical JSON of a configuration (sorted dimensions), as stored in rows and modules."""
    return json.dumps({dim: list(config[dim]) for dim in sorted(config)}, separators=(",", ":"))


def decode(text: str) -> Config:
    """The configuration :func:`encode` wrote."""
    return {dim: tuple(values) for dim, values in json.loads(text).items()}


def _as_tensor(config: Mapping[str, tuple[float, ...]]) -> Tensor:
    return torch.tensor(list(encode(config).encode()), dtype=torch.uint8)


class Student(nn.Module):
    """A static network extracted from a dynamic one, with its configuration as a buffer.

    The buffer ``config_json`` (the configuration's JSON as bytes) travels in the state dict,
    so the model cache can load a student whose shape it could not know before training:
    :meth:`load_state_dict` rebuilds the network for the stored configuration (through
    ``builder``) before loading the weights. The buffer is no parameter, so it counts in
    neither the parameter nor the MAC columns.
    """

    def __init__(self, net: nn.Module, config: Config, builder: Callable[[Config], nn.Module]) -> None:
        super().__init__()
        self.net, self.builder = net, builder
        self.register_buffer("config_json", _as_tensor(config))

    @property
    def config(self) -> Config:
        """The configuration this student was extracted with."""
        return decode(bytes(self.config_json.tolist()).decode())

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the static network."""
        out: Tensor = self.net(x)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Rebuild the network for the stored configuration, then load the weights."""
        stored = decode(bytes(state_dict["config_json"].tolist()).decode())
        if stored != self.config:
            self.net = self.builder(stored)
            self.config_json = _as_tensor(stored)
        return super().load_state_dict(state_dict, strict, assign)
