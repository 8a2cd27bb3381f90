"""Randomized variants (random gates): EOT gradients and majority verdicts (DESIGN.md §5)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pluggy
import torch
from test_runner import cells, pm, run_tiny  # noqa: F401  (pm is a fixture)
from torch import Tensor, nn

import robench
from robench import DEFAULT_EOT, DEFAULT_VOTES
from robench.execute.engine import Judge
from robench.execute.versions import ExpectationModel
from robench.plugin import PluginSpec


class _Cycle(nn.Module):
    """Predicts class 0 on calls where ``pattern`` is True, class 1 otherwise (cycling)."""

    def __init__(self, pattern: list[bool]) -> None:
        super().__init__()
        self.pattern, self.calls = pattern, 0

    def forward(self, x: Tensor) -> Tensor:
        right = self.pattern[self.calls % len(self.pattern)]
        self.calls += 1
        logits = torch.zeros(len(x), 2)
        logits[:, 0 if right else 1] = 1.0
        return logits


def test_one_lucky_draw_does_not_decide_a_verdict() -> None:
    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    # wrong, right, wrong: one draw says "wrong"; the majority of three says "wrong" too
    assert not Judge(_Cycle([False, True, False]), votes=3).correct(x, y).any()
    # right, wrong, right: a single unlucky draw would call it fooled; the majority does not
    assert not Judge(_Cycle([False, True, True]), votes=1).correct(x, y).any()
    assert Judge(_Cycle([False, True, True]), votes=3).correct(x, y).all()


def test_expectation_model_averages_probabilities() -> None:
    model = ExpectationModel(_Cycle([True, False]), draws=2)
    probs = model(torch.zeros(1, 1, 2, 2)).exp()
    assert torch.allclose(probs, torch.full((1, 2), 0.5))


class _Noisy(nn.Module):
    """A model whose prediction stays random in eval mode (like random gates)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.inner(x)
        return logits + 0.5 * torch.randn_like(logits)


@dataclass(frozen=True, kw_only=True)
class NoisyDefense(robench.Defense):
    """Baseline training, deployed with random logit noise."""

    name: ClassVar[str] = "noisy"

    def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
        from robench.training import Schedule, train

        return {"model": train(ctx.new_model(), ctx, Schedule(epochs=3, batch_size=32, lr=0.05, momentum=0.9))}

    def variant(self, name: str, model: nn.Module) -> robench.Variant:
        return robench.Variant(name=name, model=_Noisy(model), randomized=True)


class _NoisyPlugin:
    @robench.hookimpl
    def robench_defenses(self) -> list[type[robench.Defense]]:
        return [NoisyDefense]


def test_randomized_variants_get_eot_and_votes(pm: pluggy.PluginManager, tmp_path: Path) -> None:  # noqa: F811
    pm.register(_NoisyPlugin(), name="noisy")
    attack = PluginSpec.of("pgd", {"steps": 3, "restarts": 1, "stop_on_success": False})
    table = cells(run_tiny(pm, tmp_path, defenses=(PluginSpec("noisy"),), attacks=(attack,), eps=(0.2,)))
    row = table.iloc[0]
    assert row["status"] == "ok" and row["randomized"] and row["eot"] == DEFAULT_EOT and row["votes"] == DEFAULT_VOTES
    assert not row["flag_randomized_without_eot"]
    # every attack step differentiated DEFAULT_EOT draws per attacked sample (the EOT probe is not counted)
    attacked = round(row["clean_acc"] * row["n"])
    assert row["gradient_calls"] == 3 * DEFAULT_EOT * attacked
    assert (
        row["eot_half"] == DEFAULT_EOT // 2
        and 0 <= row["eot_p"] <= 1
        and abs(row["eot_full_acc"] - row["robust_acc"]) < 1e-12
    )


def test_p_sets_eot_and_votes_of_a_one_attack_protocol(pm: pluggy.PluginManager, tmp_path: Path) -> None:  # noqa: F811
    pm.register(_NoisyPlugin(), name="noisy")
    attack = PluginSpec.of("pgd", {"steps": 2, "restarts": 1, "stop_on_success": False})
    settings = (PluginSpec.of("pgd", {"eot": 4, "votes": 3}),)
    table = cells(
        run_tiny(pm, tmp_path, defenses=(PluginSpec("noisy"),), attacks=(attack,), attack_settings=settings, eps=(0.2,))
    )
    row = table.iloc[0]
    assert (row["eot"], row["votes"], row["eot_half"]) == (4, 3, 2)
    assert row["gradient_calls"] == 2 * 4 * round(row["clean_acc"] * row["n"])
