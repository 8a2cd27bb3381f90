"""The report's section on the indicators of attack failure (robench/execute/indicators.py).

One line per indicator: what it measures, on how many cells it fired, and its range over
the cells; then each cell where one fired, with the values. Cells stored by a robench
without indicators (results schema 2 or older) are counted apart.
"""

from __future__ import annotations

import math

import pandas as pd

MEANING = {
    "silent_success": "silent success (fooled on the path, not at the returned point)",
    "incomplete_optimization": "incomplete optimisation (loss still moving over the last 10 steps)",
    "transfer_failure": "transfer failure (fooled the surrogate, not the model)",
    "unavailable_gradients": "unavailable gradients (no gradient path, or zero gradients)",
    "unstable_predictions": "unstable predictions (relative loss change under noise of width 8/255)",
    "unconstrained_failure": "unconstrained attack failure (samples the attack without eps misses)",
}
"""Each indicator's name in the report, in the order of the ``indicators`` column."""


def indicators_section(cells: pd.DataFrame) -> list[str]:
    """The markdown lines of the section, for the ``ok`` cells of a run."""
    lines = ["## Indicators of attack failure", ""]
    ran = cells[cells["indicators"].notna()] if "indicators" in cells else cells.iloc[:0]
    if ran.empty:
        return [*lines, "Not computed: these cells come from a robench without them.", ""]
    share = ran["indicator_seconds"].sum() / max((ran["indicator_seconds"] + ran["attack_seconds"]).sum(), 1e-9)
    lines += [
        "After Pintor et al. (NeurIPS 2022), on each cell's check samples: the path of the cell's first white-box "
        "version (recorded as it ran), that version rerun without an eps bound, its loss under noise, the transfer "
        f"examples against their surrogates. They took {ran['indicator_seconds'].sum():.2f} s, "
        f"{100 * share:.2f} % of the cells' evaluation time. {int((ran['indicators'] == 'ok').sum())} of {len(ran)} "
        "cells: ok.",
        "",
    ]
    for name, meaning in MEANING.items():
        values = ran[f"indicator_{name}"].dropna().astype(float)
        fired = ran["indicators"].str.split(",").apply(lambda names, n=name: n in names)
        span = f"{values.min():.2f} to {values.max():.2f}" if len(values) else "not applicable"
        lines.append(f"- {meaning}: fired on {int(fired.sum())} of {len(ran)} cells; values {span}")
    lines.append("")
    for _, row in ran[~ran["indicators"].isin(["ok", "n/a"])].sort_values("cell_id").iterrows():
        found = ", ".join(f"{n} {_value(row[f'indicator_{n}'])}" for n in row["indicators"].split(","))
        lines.append(f"- `{row['cell_id']}` ({row['indicator_attack'] or 'no white-box version'}): {found}")
    if len(cells) > len(ran):
        lines.append(f"- {len(cells) - len(ran)} cells come from a robench without indicators.")
    return [*lines, ""]


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    number = float(value)  # type: ignore[arg-type]
    return "n/a" if math.isnan(number) else f"{number:.2f}"
