"""Helpers the ``checkpoint`` defense's modules share to word their errors alike."""

from __future__ import annotations

import re

import robench

SHOWN = 5
"""How many keys an error lists."""


def config_error(message: str) -> robench.ConfigError:
    """A :class:`robench.ConfigError` naming the defense."""
    return robench.ConfigError(f"defense 'checkpoint': {message}")


def dataset_name(ctx: robench.Context) -> str:
    """``dataset 'NAME'`` for messages."""
    return f"dataset {ctx.dataset!r}" if ctx.dataset else "the cell's dataset"


def listing(keys: list[str]) -> str:
    """The first few of ``keys``, for messages."""
    return ", ".join(keys[:SHOWN]) + (", ..." if len(keys) > SHOWN else "")


def first_line(exc: BaseException) -> str:
    """An exception's type and first line, for messages (the last for a TorchScript traceback)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()] or [""]
    text = lines[-1 if "TorchScript interpreter" in lines[0] else 0].strip()
    return text if re.match(r"\w+(Error|Exception): ", text) else f"{type(exc).__name__}: {text}"
