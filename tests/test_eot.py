"""EOT that is enough, and says so: ``eot`` and ``votes`` as settings of every protocol, and the
probe that flags a randomized cell whose accuracy still falls when the draws double."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from conftest import Shell
from torch import Tensor, nn

from robench import DEFAULT_EOT, DEFAULT_VOTES, ImageData, Threat, Variant
from robench.context import Progress
from robench.discover.manager import get_plugin_manager
from robench.discover.registry import Registries
from robench.errors import ConfigError
from robench.execute.engine import Setup, evaluate
from robench.execute.eotcheck import binomial_tail, eot_check, eot_columns
from robench.execute.versions import expand
from robench.plan.benchfile import load_benchmark
from robench.plan.config import Benchmark
from robench.plan.grid import plan, resolve_protocols
from robench.plugin import PluginSpec
from robench.protocol import Protocol, single_attack


@pytest.fixture(scope="module")
def registries() -> Registries:
    return Registries.collect(get_plugin_manager())


def _protocols(registries: Registries, **values: object) -> list[Protocol]:
    return resolve_protocols(Benchmark(name="t", defenses=(PluginSpec("baseline"),), **values), registries)  # type: ignore[arg-type]


def test_every_protocol_takes_eot_and_votes(registries: Registries) -> None:
    (default,) = _protocols(registries, attacks=(PluginSpec("pgd"),))
    assert (default.eot, default.votes) == (DEFAULT_EOT, DEFAULT_VOTES)
    one, named, eot_pgd = _protocols(
        registries,
        attacks=(PluginSpec("pgd"),),
        attack_settings=(PluginSpec.of("pgd", {"eot": 40}),),
        protocols=(PluginSpec.of("whitebox-pgd", {"eot": 20, "votes": 3}), PluginSpec.of("eot-pgd", {"eot": 7})),
    )
    assert (one.eot, one.votes) == (40, DEFAULT_VOTES) and (named.eot, named.votes) == (20, 3)
    # eot-pgd averages its own draws: eot sets the attack's eot_iter, the runner adds none
    assert eot_pgd.eot == 1 and dict(eot_pgd.uses[0].attack.params)["eot_iter"] == 7
    assert '"eot":40' in one.canonical()  # part of the cell key: another eot is another cell


def test_unknown_settings_are_refused_for_one_attack_protocols_as_for_named(registries: Registries) -> None:
    with pytest.raises(ConfigError, match=r"unknown parameter 'eto'\. Did you mean: eot\?"):
        single_attack(PluginSpec("pgd"), {"eto": 40})
    with pytest.raises(ConfigError, match="give the attack's own parameters with -A"):
        single_attack(PluginSpec("pgd"), {"steps": 3})
    with pytest.raises(ConfigError, match="votes must be an integer >= 1"):
        single_attack(PluginSpec("pgd"), {"votes": 0})
    with pytest.raises(ConfigError, match="unknown parameter"):
        _protocols(registries, protocols=(PluginSpec.of("whitebox-pgd", {"bogus": 3}),))
    with pytest.raises(ConfigError, match="disagree"):
        _protocols(registries, protocols=(PluginSpec.of("eot-pgd", {"eot": 7, "eot_iter": 30}),))


def test_the_cli_passes_p_to_attack_protocols_and_refuses_unknown_keys(shell: Shell) -> None:
    code, out = shell(["plan", "--attack", "pgd", "-P", "bogus=3"])
    assert code == 2 and "protocol 'pgd' (--attack pgd) got unknown parameter 'bogus'" in out
    code, out = shell(["plan", "--attack", "pgd", "--protocol", "whitebox-pgd", "-P", "pgd.eot=40", "-P", "votes=3"])
    assert code == 0 and "2 cell(s)" in out
    code, out = shell(["plan", "--attack", "pgd", "-P", "fgsm.eot=40"])
    assert code == 2 and "'fgsm' is not one of the plugins in this run" in out


def test_a_benchmark_file_sets_eot_of_an_attack_entry(tmp_path: Path, registries: Registries) -> None:
    path = tmp_path / "b.toml"
    body = '[grid]\ndefense = ["baseline"]\nattack = ["pgd"]\nprotocol = ["eot-pgd"]\n'
    path.write_text(body + "[protocols.pgd]\neot = 40\n[protocols.eot-pgd]\nvotes = 3\n")
    protocols = {c.protocol.name: c.protocol for c in plan(load_benchmark(path), registries)}
    assert protocols["pgd"].eot == 40 and protocols["eot-pgd"].votes == 3
    path.write_text(body + "[protocols.pgd]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"unknown \[protocols.pgd\] .* key 'steps'.*Accepted: eot, votes"):
        load_benchmark(path)
    path.write_text(textwrap.dedent(body.replace('attack = ["pgd"]\n', "")) + "[protocols.pgd]\neot = 4\n")
    with pytest.raises(ConfigError, match=r"\[protocols.pgd\] is not used"):
        load_benchmark(path)


# -- the probe ---------------------------------------------------------------------------


class NoisyGradient(nn.Module):
    """Two classes; class 0 wins by ``margin - sum(x)``. The forward value is deterministic, but
    each call adds ``scale`` x N(0, 1) per pixel to the input gradient (a term that is zero in
    value): one draw points a sign step the wrong way on many pixels, the mean of more draws less."""

    def __init__(self, margin: Tensor, scale: float) -> None:
        super().__init__()
        self.margin, self.scale = margin, scale

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        noise = self.scale * torch.randn_like(flat) * (flat - flat.detach())
        first = self.margin[: len(x)] - flat.sum(1) + noise.sum(1)
        return torch.stack([first, torch.zeros_like(first)], dim=1)


def _probe(scale: float, eot: int, attack: str) -> tuple[int, int, bool]:
    """(lowered, raised, flag) of the probe on 40 samples whose margins need most signs right."""
    n, eps = 40, 0.1
    images = torch.full((n, 1, 8, 8), 128, dtype=torch.uint8)
    data = ImageData(images, torch.zeros(n, dtype=torch.long))
    clean_sum = 64 * 128 / 255
    # one eps step moves sum(x) by 6.4 x (2 x share of right signs - 1): 0.68 of that with 4 draws
    # of scale 2, 0.84 with 8; the margins lie in between
    margin = clean_sum + 6.4 * torch.linspace(0.66, 0.86, n)
    model = NoisyGradient(margin, scale)
    spec = {"steps": 1, "step_size": 1.0, "restarts": 1, "random_start": False}
    if attack == "eot-pgd":
        spec["eot_iter"] = eot
    use = single_attack(PluginSpec.of(attack, spec)).uses[0]
    protocol = Protocol("p", (use,), eot=1 if attack == "eot-pgd" else eot)
    versions = expand(protocol, Registries.collect(get_plugin_manager()), "linf")
    setup = Setup("k", 16, torch.device("cpu"), False, votes=1, eot=protocol.eot, channels_last=False)
    variant = Variant("model", model, randomized=True)
    torch.manual_seed(0)
    threat, indices = Threat("linf", eps), torch.arange(n)
    out = evaluate(variant, versions, threat, data, indices, setup=setup, transfer=lambda v: v, progress=Progress())  # type: ignore[arg-type,return-value]
    check = eot_check(variant, versions, out, threat, data, indices, setup)
    assert check is not None and check.half == eot // 2
    columns = eot_columns(check)
    assert columns["eot_full_acc"] == pytest.approx(float(out.robust.float().mean()))
    return check.lowered, check.raised, check.not_converged


@pytest.mark.parametrize("attack", ["pgd", "eot-pgd"])
def test_the_probe_flags_a_cell_whose_accuracy_falls_when_the_draws_double(attack: str) -> None:
    lowered, raised, flagged = _probe(scale=2.0, eot=8, attack=attack)
    assert flagged and lowered >= 10 and raised <= 3, (lowered, raised)


def test_the_probe_finds_nothing_when_the_draws_do_not_matter() -> None:
    assert _probe(scale=0.0, eot=8, attack="pgd") == (0, 0, False)  # same starts, same verdicts


def test_the_probe_skips_deterministic_variants_and_one_draw() -> None:
    assert eot_columns(None)["flag_eot_not_converged"] is False and eot_columns(None)["eot_half"] is None
    assert binomial_tail(0, 0) == 1.0 and binomial_tail(3, 3) == pytest.approx(1 / 8)
    assert binomial_tail(2, 4) == pytest.approx(11 / 16)
