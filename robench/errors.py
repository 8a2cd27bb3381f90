"""Every error robench raises on purpose. Each message says what to do next.

The CLI prints a :class:`RobenchError` without a traceback; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RobenchError(Exception):
    """Base class: a problem the user can fix (bad input, missing data, broken plugin)."""


class PluginLoadError(RobenchError):
    """A plugin's entry point could not be imported or registered."""


class PluginConflictError(RobenchError):
    """Two plugins claim the same entry-point name or the same registry name."""


class PluginValidationError(RobenchError):
    """A registration hook returned something that is not a proper plugin class."""


class UnknownPluginError(RobenchError, KeyError):
    """A name was looked up that no registered plugin provides."""

    def __init__(self, kind: str, name: str, available: Iterable[str]) -> None:
        names = sorted(available)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        super().__init__(
            f"unknown {kind} {name!r}.{hint} Available: {', '.join(names) or '(none)'}."
            " `robench list` shows every plugin."
        )

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class ConfigError(RobenchError):
    """A benchmark or command-line setting is invalid; raised before any compute."""


class DataNotFoundError(RobenchError):
    """A dataset's files were not found in any of the places robench looks."""


class CacheError(RobenchError):
    """A cached artefact is missing (`robench run --models`), corrupt, or does not match its key."""


class DamagedFileWarning(UserWarning):
    """A file of a run folder could not be read and was skipped; the rest was read."""
