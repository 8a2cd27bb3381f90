"""Registries: classes tied to the plugin that returned them, conflicts, lookups and validation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import pluggy
import pytest
import torch
from torch import Tensor, nn

import robench
from robench.discover.manager import PluginInfo, get_plugin_manager
from robench.discover.registry import Registries, Registry
from robench.errors import PluginConflictError, PluginValidationError, UnknownPluginError
from robench.plugins import pgd as builtin_pgd

VERSION = robench.__version__


@dataclass(frozen=True, kw_only=True)
class Identity(robench.Attack):
    """Returns the clean inputs."""

    name: ClassVar[str] = "identity"

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, threat: robench.Threat, keys: Tensor) -> Tensor:
        """Return ``x``."""
        return x


def attacks_plugin(returned: Any) -> object:
    """An inline plugin whose ``robench_attacks`` returns ``returned`` as is."""

    class Plugin:
        @robench.hookimpl
        def robench_attacks(self) -> Any:
            return returned

    return Plugin()


def empty_pm() -> pluggy.PluginManager:
    """A manager with no entry points at all (a group nothing declares)."""
    return get_plugin_manager(group="robench-test-empty")


# -- Conflicts and lookups -------------------------------------------------------------


def test_builtin_classes_are_tied_to_their_plugins(pm: pluggy.PluginManager) -> None:
    registries = Registries.collect(pm)
    assert registries.attacks.entry("pgd").cls is builtin_pgd.PGD
    assert registries.attacks.entry("pgd").plugin == PluginInfo("pgd", "robench", VERSION, "robench.plugins.pgd")
    assert registries.defenses.entry("baseline").plugin.display_name == "robench[standard]"
    assert registries.datasets.entry("cifar10").plugin.display_name == "robench[cifar]"
    assert registries.architectures.entry("cnn8").plugin.display_name == "robench[architectures]"
    assert registries.attacks.names() == sorted(registries.attacks.names())


def test_duplicate_registry_name_names_both_providers(pm: pluggy.PluginManager) -> None:
    @dataclass(frozen=True, kw_only=True)
    class OtherPGD(Identity):
        """Claims the built-in name."""

        name: ClassVar[str] = "pgd"

    pm.register(attacks_plugin([OtherPGD]), name="x")
    with pytest.raises(PluginConflictError) as info:
        Registries.collect(pm)
    message = str(info.value)
    assert message.startswith(f"attack 'pgd' is provided by both robench[pgd] (robench {VERSION}) and <registered>[x]")


def test_duplicate_within_one_plugin_is_a_conflict_too() -> None:
    pm = empty_pm()
    pm.register(attacks_plugin([Identity, Identity]), name="x")
    with pytest.raises(PluginConflictError, match=r"attack 'identity' is provided by both <registered>\[x\]"):
        Registries.collect(pm)


def test_unknown_name_suggests_the_close_one() -> None:
    attacks = Registries.collect(get_plugin_manager(disabled=["transfer", "zoo", "corruptions"])).attacks
    with pytest.raises(UnknownPluginError) as info:
        attacks.get("pdg")
    assert str(info.value) == (
        "unknown attack 'pdg'. Did you mean: pgd? Available: fgsm, pgd. `robench list` shows every plugin."
    )
    assert isinstance(info.value, KeyError)


def test_unknown_name_without_a_close_match_lists_what_exists(pm: pluggy.PluginManager) -> None:
    defenses = Registries.collect(pm).defenses
    with pytest.raises(UnknownPluginError) as info:
        defenses.get("quantum")
    assert "Did you mean" not in str(info.value)
    # every registered defense, sorted (built-in defenses keep landing: no fixed list here)
    assert {"advt", "baseline"} <= set(defenses.names())
    assert f"Available: {', '.join(sorted(defenses.names()))}." in str(info.value)


def test_empty_registry_says_none_available() -> None:
    with pytest.raises(UnknownPluginError, match=r"Available: \(none\)"):
        Registries.collect(empty_pm()).attacks.get("pgd")


# -- Validation ------------------------------------------------------------------------


class NotAnAttack:
    """Not a robench.Attack subclass."""

    name = "notattack"


@dataclass(frozen=True, kw_only=True)
class Shouting(Identity):
    """Upper-case name."""

    name: ClassVar[str] = "Shouting"


@dataclass(frozen=True, kw_only=True)
class Nameless(robench.Attack):
    """No name at all (and no perturb, but the name is checked first)."""


@dataclass(frozen=True, kw_only=True)
class Abstract(robench.Attack):
    """Forgets to implement perturb."""

    name: ClassVar[str] = "abstract"


class NotDataclass(Identity):
    """Subclass without @dataclass: its field annotations are not parameters."""

    name: ClassVar[str] = "notdataclass"
    steps: int = 3


INVALID = [
    pytest.param(Identity, r"robench_attacks\(\) must return a list of classes, got <class ", id="bare-class"),
    pytest.param("identity", r"must return a list of classes, got 'identity'", id="string"),
    pytest.param(None, r"must return a list of classes, got None", id="none"),
    pytest.param([Identity()], r"returned Identity\(\), which is not a subclass of robench\.Attack", id="instance"),
    pytest.param([NotAnAttack], r"which is not a subclass of robench\.Attack", id="not-subclass"),
    pytest.param([builtin_pgd.PGD.perturb], r"which is not a subclass of robench\.Attack", id="function"),
    pytest.param([Shouting], r"Shouting needs a non-empty lowercase `name`, got 'Shouting'", id="uppercase-name"),
    pytest.param([Nameless], r"Nameless needs a non-empty lowercase `name`, got None", id="no-name"),
    pytest.param([Abstract], r"Abstract does not implement perturb", id="abstract"),
]


@pytest.mark.parametrize(("returned", "pattern"), INVALID)
def test_invalid_registration_names_the_plugin(returned: Any, pattern: str) -> None:
    pm = empty_pm()
    pm.register(attacks_plugin(returned), name="x")
    with pytest.raises(PluginValidationError, match=r"^<registered>\[x\]: .*" + pattern):
        Registries.collect(pm)


def test_non_dataclass_check_names_the_plugin() -> None:
    """The dataclass check itself, with a base that is not a dataclass."""

    class Base:
        name = ""

    class Plain(Base):
        name = "plain"

    class Plugin:
        @robench.hookimpl
        def robench_attacks(self) -> list[type[Base]]:
            return [Plain]

    pm = empty_pm()
    pm.register(Plugin(), name="x")
    with pytest.raises(PluginValidationError, match=r"^<registered>\[x\]: .*Plain must be a dataclass"):
        Registry.collect(pm, "robench_attacks", Base, "attack")


def test_subclass_without_dataclass_decorator_is_rejected() -> None:
    pm = empty_pm()
    pm.register(attacks_plugin([NotDataclass]), name="x")
    with pytest.raises(PluginValidationError, match=r"NotDataclass must be a dataclass"):
        Registries.collect(pm)


# -- A third-party distribution, end to end --------------------------------------------


def test_third_party_attack_is_found_with_its_distribution(fake_pm: Callable[..., pluggy.PluginManager]) -> None:
    registries = Registries.collect(fake_pm())
    assert registries.attacks.names() == ["noise"]
    entry = registries.attacks.entry("noise")
    assert entry.plugin == PluginInfo("ok", "robench-fake", "0.1", "robench_fake.ok")
    assert entry.plugin.display_name == "robench-fake[ok]"
    assert entry.cls.__module__ == "robench_fake.ok"
    assert registries.defenses.names() == registries.datasets.names() == registries.architectures.names() == []


def test_third_party_attack_keeps_the_attack_contract(fake_pm: Callable[..., pluggy.PluginManager]) -> None:
    noise = Registries.collect(fake_pm()).attacks.get("noise").create({"scale": 1})
    x = torch.rand(4, 1, 5, 5)
    keys = torch.tensor([11, 12, 13, 14])
    threat = robench.Threat(norm="linf", eps=0.1)
    adv = noise.perturb(nn.Identity(), x, torch.zeros(4), threat, keys)
    assert adv.shape == x.shape
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    # Per-sample draws: sample 2 is perturbed the same whatever batch it is in.
    alone = noise.perturb(nn.Identity(), x[2:3], torch.zeros(1), threat, keys[2:3])
    assert torch.equal(alone, adv[2:3])
    assert not torch.equal(adv[0] - x[0], adv[1] - x[1])


def test_third_party_name_clash_with_a_builtin(fake_pm: Callable[..., pluggy.PluginManager]) -> None:
    pm = fake_pm(disabled=["broken", "typo"])
    pm.register(builtin_pgd, name="pgd")
    with pytest.raises(PluginConflictError) as info:
        Registries.collect(pm)
    assert str(info.value).startswith(
        "attack 'pgd' is provided by both robench-fake[dupe] (robench-fake 0.1) and <registered>[pgd]"
    )


def test_builtin_name_clash_with_a_third_party_module(pm: pluggy.PluginManager) -> None:
    import robench_fake.dupe

    pm.register(robench_fake.dupe, name="dupe")
    with pytest.raises(PluginConflictError) as info:
        Registries.collect(pm)
    message = str(info.value)
    assert message.startswith(
        f"attack 'pgd' is provided by both robench[pgd] (robench {VERSION}) and <registered>[dupe]"
    )
