"""Choosing a student per budget: MACs of configurations, budgets, a small held-out search.

A budget is ``smallest`` (the smallest configuration), ``largest`` (the largest: the
dynamic teacher's architecture), ``median`` (a MACs budget at the median MACs of
configurations drawn uniformly from the whole space), ``macs:<n>`` or ``params:<n>``.

Search (METHODS.md §4.6 describes the released one: an accuracy/robustness predictor fitted
on 2000 sampled subnets, then NSGA-II under a FLOPs limit). Here, as the issue allows, a
budget's student is the best of ``candidates`` configurations drawn uniformly among those
within the budget (rejection sampling; the largest and smallest configurations within it
are always candidates): each is extracted, its BatchNorm recalibrated, and scored on
held-out training images by its robust accuracy under a short PGD, clean accuracy breaking
ties. With a handful of candidates this costs minutes on a CPU, where a predictor would
need hundreds of evaluated subnets before it ranks better than the evaluations themselves.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from robench.plugins.proard.space import Config, encode, extreme_config, sample_config

BUDGET_NAMES = ("smallest", "median", "largest")


def parse_budget(text: str) -> tuple[str, float]:
    """``(kind, value)`` of a budget string; raises ValueError naming the accepted forms."""
    if text in BUDGET_NAMES:
        return text, 0.0
    kind, _, number = text.partition(":")
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if kind not in ("macs", "params") or value <= 0:
        raise ValueError(f"student budget {text!r}: use smallest, median, largest, macs:<n> or params:<n> (n > 0)")
    return kind, value


def variant_name(text: str) -> str:
    """The variant name of a budget: ``smallest``, ..., or ``macs-1.2e+06`` (file- and id-safe)."""
    kind, value = parse_budget(text)
    return text if kind in BUDGET_NAMES else f"{kind}-{value:g}"


@dataclass(frozen=True)
class Cost:
    """A configuration's MACs per image and parameter count (as the runner measures them)."""

    macs: int
    params: int


class Costs:
    """MACs and parameters of configurations, measured on extracted static networks (cached).

    torch's FLOP counter on the static network, as the runner's efficiency columns use, so a
    budget means the same number as the ``macs`` column.
    """

    def __init__(self, extract: Callable[[Config], nn.Module], example: Tensor) -> None:
        self.extract, self.example, self.cache = extract, example, dict[str, Cost]()

    def __call__(self, config: Config) -> Cost:
        """The cost of ``config``."""
        key = encode(config)
        if key not in self.cache:
            net = self.extract(config)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                net(self.example)
            self.cache[key] = Cost(counter.get_total_flops() // 2, sum(p.numel() for p in net.parameters()))
        return self.cache[key]


@dataclass(frozen=True)
class Space:
    """What the search needs to know of a dynamic network's configurations."""

    lengths: dict[str, int]
    choices: dict[str, tuple[float, ...]]

    def largest(self) -> Config:
        """Every dimension at its largest choice."""
        return extreme_config(self.lengths, self.choices, largest=True)

    def smallest(self) -> Config:
        """Every dimension at its smallest choice."""
        return extreme_config(self.lengths, self.choices, largest=False)

    def sample(self, gen: torch.Generator) -> Config:
        """A configuration drawn uniformly from the whole space."""
        return sample_config(self.lengths, self.choices, gen)


def median_macs(space: Space, costs: Costs, gen: torch.Generator, draws: int = 100) -> float:
    """The median MACs of ``draws`` configurations drawn uniformly from the whole space."""
    return float(statistics.median(costs(space.sample(gen)).macs for _ in range(draws)))


def candidates(
    budget: str, space: Space, costs: Costs, gen: torch.Generator, count: int, tries: int = 2000
) -> list[Config]:
    """The configurations the search compares for ``budget`` (one for smallest/largest).

    Rejection sampling from the whole space: up to ``count`` distinct configurations within
    the budget, the smallest configuration always among them. A budget below the smallest
    configuration's cost raises ValueError.
    """
    kind, value = parse_budget(budget)
    if kind in ("smallest", "largest"):
        return [space.smallest() if kind == "smallest" else space.largest()]
    if kind == "median":
        kind, value = "macs", median_macs(space, costs, gen)

    def fits(config: Config) -> bool:
        cost = costs(config)
        return (cost.macs if kind == "macs" else cost.params) <= value

    if not fits(space.smallest()):
        raise ValueError(f"student budget {budget!r} is below the smallest configuration's {kind}")
    found = {encode(space.largest()): space.largest()} if fits(space.largest()) else {}
    found.setdefault(encode(space.smallest()), space.smallest())
    for _ in range(tries):
        if len(found) >= count:
            break
        config = space.sample(gen)
        if fits(config):
            found.setdefault(encode(config), config)
    return list(found.values())


def score(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, seed: int) -> tuple[float, float]:
    """(robust, clean) accuracy of ``model`` on ``(x, y)`` under ``steps``-step Linf PGD (eps/4 steps, random start)."""
    import torchattacks  # imported here: it costs seconds (scipy)

    model.eval()
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adv = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=steps, random_start=True)(x, y)
    with torch.no_grad():
        robust = (model(adv).argmax(1) == y) & clean
    return float(robust.float().mean()), float(clean.float().mean())
