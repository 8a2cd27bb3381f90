"""Name -> plugin class lookup, built from the registration hooks.

Each class is tied to the plugin that returned it (by iterating hook implementations
rather than calling the hook), so every error names the culprit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pluggy

from robench.architecture import Architecture
from robench.attack import Attack
from robench.dataset import Dataset
from robench.defense import Defense
from robench.discover.manager import PluginInfo, plugin_infos
from robench.errors import PluginConflictError, PluginValidationError, UnknownPluginError
from robench.protocol import ProtocolDef

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered class and the plugin that provides it."""

    cls: type[T]
    plugin: PluginInfo


class Registry(Generic[T]):
    """All classes of one plugin kind, by name."""

    def __init__(self, kind: str, entries: dict[str, Entry[T]]) -> None:
        self.kind = kind
        self._entries = entries

    @classmethod
    def collect(cls, pm: pluggy.PluginManager, hook: str, base: type[Any], kind: str) -> Registry[T]:
        """Call ``hook`` on every plugin and check what each returned."""
        infos = plugin_infos(pm)
        entries: dict[str, Entry[T]] = {}
        for impl in getattr(pm.hook, hook).get_hookimpls():
            info = infos[impl.plugin_name]
            returned = impl.function()
            if not isinstance(returned, Sequence) or isinstance(returned, str):
                raise PluginValidationError(
                    f"{info.display_name}: {hook}() must return a list of classes, got {returned!r}"
                )
            for item in returned:
                name = _check_class(item, base, info, hook)
                if name in entries:
                    other = entries[name].plugin
                    raise PluginConflictError(
                        f"{kind} {name!r} is provided by both {_provider(other)} and {_provider(info)}"
                    )
                entries[name] = Entry(item, info)
        return cls(kind, dict(sorted(entries.items())))

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; a near-miss gets suggestions."""
        return self.entry(name).cls

    def entry(self, name: str) -> Entry[T]:
        """The class and its providing plugin."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownPluginError(self.kind, name, self._entries) from None

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return list(self._entries)

    def __iter__(self) -> Iterator[tuple[str, Entry[T]]]:
        return iter(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries


@dataclass(frozen=True)
class Registries:
    """The four registries robench uses."""

    attacks: Registry[Attack]
    defenses: Registry[Defense]
    datasets: Registry[Dataset]
    architectures: Registry[Architecture]
    protocols: Registry[ProtocolDef]

    @classmethod
    def collect(cls, pm: pluggy.PluginManager) -> Registries:
        """Build every registry from ``pm``."""
        return cls(
            attacks=Registry.collect(pm, "robench_attacks", Attack, "attack"),
            defenses=Registry.collect(pm, "robench_defenses", Defense, "defense"),
            datasets=Registry.collect(pm, "robench_datasets", Dataset, "dataset"),
            architectures=Registry.collect(pm, "robench_architectures", Architecture, "architecture"),
            protocols=Registry.collect(pm, "robench_protocols", ProtocolDef, "protocol"),
        )


def _provider(info: PluginInfo) -> str:
    return f"{info.display_name} ({f'{info.dist} {info.version}'.strip()})"


def _check_class(item: Any, base: type[Any], info: PluginInfo, hook: str) -> str:
    if not (isinstance(item, type) and issubclass(item, base)):
        raise PluginValidationError(
            f"{info.display_name}: {hook}() returned {item!r}, which is not a subclass of robench.{base.__name__}"
        )
    name = getattr(item, "name", None)
    if not isinstance(name, str) or not name or name != name.lower():
        raise PluginValidationError(
            f"{info.display_name}: {item.__qualname__} needs a non-empty lowercase `name`, got {name!r}"
        )
    if getattr(item, "__abstractmethods__", None):
        missing = ", ".join(sorted(getattr(item, "__abstractmethods__", ())))
        raise PluginValidationError(f"{info.display_name}: {item.__qualname__} does not implement {missing}")
    if "__dataclass_fields__" not in vars(item):  # the base classes are dataclasses: check the class itself
        raise PluginValidationError(
            f"{info.display_name}: {item.__qualname__} must be a dataclass "
            "(@dataclass(frozen=True, kw_only=True)); its fields are its parameters"
        )
    return name
