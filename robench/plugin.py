"""What every plugin class shares: a registry name, a one-line summary, validated parameters.

Plugin classes are frozen, keyword-only dataclasses whose fields are their parameters, so
configs, repr and provenance come free (STYLE.md §2.3). :meth:`Plugin.create` checks user
parameters against those fields before any compute.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from robench.errors import ConfigError


class Plugin:
    """Mixin for attack, defense, dataset and architecture classes."""

    name: ClassVar[str]
    kind: ClassVar[str] = "plugin"

    @classmethod
    def summary(cls) -> str:
        """The first line of the class docstring, for ``robench list``."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def describe(cls) -> str:
        """The whole docstring, each parameter with its type and default, and the presets
        (for ``robench list KIND NAME``)."""
        lines = [f"{cls.kind} {cls.name}", "", inspect.getdoc(cls) or "(no docstring)", ""]
        fields: dict[str, dataclasses.Field[Any]] = (
            {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        )
        accepted = cls.accepted()
        lines.append("parameters (defaults):" if accepted else "parameters: none")
        for key, tp in accepted.items():
            default = fields[key].default
            shown = "required" if default is dataclasses.MISSING else repr(default)
            lines.append(f"  {key}: {_type_name(tp)} = {shown}")
        presets: Mapping[str, Mapping[str, object]] = getattr(cls, "presets", {})
        if presets:
            lines += ["", "presets (override the defaults; parameters you give override both):"]
            for preset, values in presets.items():
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items()) or "the defaults"
                lines.append(f"  {preset}: {shown}")
        return "\n".join(lines)

    @classmethod
    def accepted(cls) -> dict[str, Any]:
        """Parameter name -> annotated type, for every dataclass field."""
        if not dataclasses.is_dataclass(cls):
            return {}
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}

    @classmethod
    def create(cls, params: Mapping[str, object] | None = None) -> Self:
        """Instantiate with ``params``, rejecting unknown names and ill-typed values."""
        params = dict(params or {})
        accepted = cls.accepted()
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            listing = ", ".join(f"{k}: {_type_name(t)}" for k, t in accepted.items()) or "none"
            raise ConfigError(
                f"{cls.kind} {cls.name!r} got unknown parameter(s) {', '.join(unknown)}. "
                f"Accepted parameters: {listing}."
            )
        for key, value in params.items():
            params[key] = _coerce(cls, key, value, accepted[key])
        try:
            return cls(**params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{cls.kind} {cls.name!r}: {exc}") from exc

    def params(self) -> dict[str, object]:
        """The instance's parameters as plain values."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def canonical(self) -> str:
        """Parameters as canonical JSON (sorted keys): part of cache keys and result rows."""
        return json.dumps(self.params(), sort_keys=True, separators=(",", ":"))


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(cls: type[Plugin], key: str, value: object, tp: Any) -> object:
    """Check ``value`` against the field type ``tp``; ints are accepted for floats."""
    where = f"{cls.kind} {cls.name!r} parameter {key!r}"
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where} must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        tp = next(t for t in options if t is not type(None))
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(cls, key, v, item) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


@dataclass(frozen=True)
class PluginSpec:
    """A plugin name with user parameters (which override the preset's)."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, name: str, params: Mapping[str, Any] | None = None) -> PluginSpec:
        """Build from a mapping of parameters."""
        return cls(name, tuple(sorted((params or {}).items())))

    def param_dict(self) -> dict[str, Any]:
        """Parameters as a dict."""
        return dict(self.params)

    def label(self) -> str:
        """``name`` or ``name[k=v,...]``: readable, for cell ids."""
        if not self.params:
            return self.name
        return f"{self.name}[{','.join(f'{k}={_short(v)}' for k, v in self.params)}]"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
