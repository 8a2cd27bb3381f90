"""Published numbers beside robench's: the reference columns of a row and ``flag_above_reference``.

A defense may attach a :class:`~robench.defense.Reference` (a published evaluation of its
model, e.g. RobustBench's leaderboard) to a variant. Every row of that variant carries the
published numbers; a row that repeats the published evaluation is flagged when robench's
robust accuracy is above the published one by more than its own 95 % interval: an attack
weaker than the published one, a model missing its input normalisation, or another weights
file than the one published would each show this way.
"""

from __future__ import annotations

import math
from typing import Any

from robench.cell import Cell
from robench.defense import Reference

SUSPECTS = (
    "a weaker attack than the published evaluation's (fewer steps or restarts, a gradient that does not reach "
    "the input)",
    "a model missing the input normalisation it was trained with",
    "another weights file than the published one (compare weights_sha256 with the file's source)",
)
"""What a row flagged ``flag_above_reference`` makes one suspect, most likely first."""


def follows(cell: Cell, reference: Reference) -> bool:
    """Whether ``cell`` repeats the published evaluation: same protocol (and exact spec when
    the reference names one), threat norm and radius, and sample order."""
    return (
        cell.protocol.name == reference.protocol
        and (not reference.protocol_spec or cell.protocol.canonical() == reference.protocol_spec)
        and cell.norm == reference.norm
        and math.isclose(cell.eps, reference.eps, rel_tol=1e-6, abs_tol=1e-9)
        and cell.sample_order == reference.sample_order
    )


def reference_columns(cell: Cell, reference: Reference | None, robust_ci_low: float) -> dict[str, Any]:
    """The row's ``reference_*`` columns and ``flag_above_reference`` (nulls and False without a reference)."""
    if reference is None:
        return {
            "reference_clean_acc": None,
            "reference_robust_acc": None,
            "reference_source": "",
            "reference_followed": False,
            "flag_above_reference": False,
        }
    followed = follows(cell, reference)
    return {
        "reference_clean_acc": reference.clean_acc,
        "reference_robust_acc": reference.robust_acc,
        "reference_source": reference.source,
        "reference_followed": followed,
        # above by more than the interval: the published number lies below the interval's low end
        "flag_above_reference": bool(followed and robust_ci_low > reference.robust_acc),
    }
