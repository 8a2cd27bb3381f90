"""Shared pieces of the report writers: off-screen figures and file-name slugs."""

from __future__ import annotations

import re

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def figure(size: tuple[float, float] = (7, 4.5)) -> Figure:
    """A figure of ``size`` inches on the Agg canvas (no display needed), laid out to fit its labels."""
    fig = Figure(figsize=size, dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def slug(name: str) -> str:
    """``name`` as one file-name component (a protocol label has brackets, commas and '=')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")
