"""Build the pluggy plugin manager from the ``robench`` entry-point group.

Built-in and third-party plugins arrive the same way, through entry points; a plugin that
fails to load stops robench with its name and the original error, because a silently
missing attack would change benchmark numbers.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pluggy

from robench import hookspecs
from robench.errors import PluginConflictError, PluginLoadError

DISABLE_ENV = "ROBENCH_DISABLE_PLUGINS"
TRACE_ENV = "ROBENCH_TRACE_HOOKS"


@dataclass(frozen=True)
class PluginInfo:
    """One loaded entry point: its name and the distribution that provides it."""

    name: str
    dist: str
    version: str
    module: str

    @property
    def display_name(self) -> str:
        """``dist[entry]``, the form every error message uses."""
        return f"{self.dist}[{self.name}]"


def get_plugin_manager(*, group: str = "robench", disabled: Iterable[str] = ()) -> pluggy.PluginManager:
    """A fresh manager with every plugin of ``group`` loaded, except the disabled ones.

    :param group: the entry-point group to scan (tests use a separate one)
    :param disabled: plugin (entry-point) names to skip, added to ``$ROBENCH_DISABLE_PLUGINS``
    """
    pm = pluggy.PluginManager("robench")
    pm.add_hookspecs(hookspecs)
    blocked = set(disabled) | {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    for name in sorted(blocked):
        pm.set_blocked(name)
    infos: dict[str, PluginInfo] = {}
    for ep in sorted(md.entry_points(group=group), key=lambda e: (e.name, e.value)):
        if pm.is_blocked(ep.name):  # blocking also resolves a name clash between distributions
            continue
        info = _info(ep)
        if ep.name in infos:
            raise PluginConflictError(
                f"plugin name {ep.name!r} is provided by both {infos[ep.name].display_name} "
                f"({infos[ep.name].module}) and {info.display_name} ({info.module}); "
                f"uninstall one of them or block it with {DISABLE_ENV}"
            )
        infos[ep.name] = info
        _register(pm, ep, info)
    pm.robench_infos = infos  # type: ignore[attr-defined]
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        culprit = infos.get(pm.get_name(exc.plugin) or "")
        where = culprit.display_name if culprit else str(exc.plugin)
        raise PluginLoadError(f"robench could not load plugin {where}: {exc}") from exc
    if os.environ.get(TRACE_ENV):
        pm.add_hookcall_monitoring(_trace_before, _trace_after)
    return pm


@functools.cache
def default_plugin_manager() -> pluggy.PluginManager:
    """The CLI's shared manager for the ``robench`` group (tests build their own)."""
    return get_plugin_manager()


def plugin_distributions(group: str = "robench") -> list[tuple[str, str]]:
    """(distribution, version) of every installed plugin, from package metadata alone: no
    plugin is imported, so ``robench --version`` answers before torch loads."""
    return sorted({(i.dist, i.version) for i in map(_info, md.entry_points(group=group))})


def plugin_infos(pm: pluggy.PluginManager) -> dict[str, PluginInfo]:
    """Entry-point name -> :class:`PluginInfo`; plugins registered by hand get a stand-in."""
    known: dict[str, PluginInfo] = getattr(pm, "robench_infos", {})
    out = {}
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        if name in known:
            out[name] = known[name]
        else:
            module = getattr(plugin, "__name__", type(plugin).__module__)
            out[name] = PluginInfo(name, "<registered>", "", str(module))
    return out


def _info(ep: md.EntryPoint) -> PluginInfo:
    dist = ep.dist
    return PluginInfo(
        name=ep.name,
        dist=dist.name if dist is not None else "<unknown>",
        version=dist.version if dist is not None else "",
        module=ep.value,
    )


def _register(pm: pluggy.PluginManager, ep: md.EntryPoint, info: PluginInfo) -> None:
    """Import the entry point and register it; any failure names the plugin."""
    try:
        pm.register(ep.load(), name=ep.name)
    except Exception as exc:
        raise PluginLoadError(
            f"robench could not load plugin {info.display_name} ({info.module}): {type(exc).__name__}: {exc}"
        ) from exc


def _trace_before(hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
    print(f"[robench hook] {hook_name}({', '.join(kwargs)}) -> {len(hook_impls)} impl(s)", file=sys.stderr)


def _trace_after(
    outcome: pluggy.Result[Any], hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]
) -> None:
    print(f"[robench hook] {hook_name} done", file=sys.stderr)
