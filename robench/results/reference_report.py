"""The report's "Published numbers" section: robench's accuracies beside a model's published ones."""

from __future__ import annotations

import pandas as pd

from robench.results.metrics import wilson_interval
from robench.results.reference import SUSPECTS


def reference_section(cells: pd.DataFrame) -> list[str]:
    """A table of the cells whose model has published numbers, and what a flagged one suggests."""
    if "reference_source" not in cells:
        return []
    rows = cells[cells["reference_source"].fillna("").astype(str) != ""].sort_values("cell_id")
    if rows.empty:
        return []
    head = ["cell", "clean %", "published clean %", "robust % [95% CI]", "published robust %", "verdict"]
    lines = [
        "## Published numbers",
        "",
        "Each model's published accuracies beside robench's. Only a cell that repeats the published "
        "evaluation (its protocol, threat and sample order) is judged against them; the others show them for "
        "orientation.",
        "",
        _row(head),
        _row(["---"] * len(head)),
    ]
    for _, r in rows.iterrows():
        lines.append(
            _row(
                [
                    f"`{r['cell_id']}`",
                    f"{100 * r['clean_acc']:.1f}",
                    _percent(r["reference_clean_acc"]),
                    f"{100 * r['robust_acc']:.1f} [{100 * r['robust_ci_low']:.1f}, {100 * r['robust_ci_high']:.1f}]",
                    _percent(r["reference_robust_acc"]),
                    _verdict(r),
                ]
            )
        )
    lines += ["", "Sources:", *(f"- {s}" for s in sorted(set(rows["reference_source"].astype(str)))), ""]
    flagged = rows[rows["flag_above_reference"].fillna(False).astype(bool)]
    if not flagged.empty:
        lines += [
            f"**{len(flagged)} cell(s) more robust than published** (`flag_above_reference`): robench found fewer "
            "adversarial examples than the published evaluation did. Suspect, in this order:",
            "",
            *(f"{i}. {s};" for i, s in enumerate(SUSPECTS, start=1)),
            "",
        ]
    return lines


def _verdict(row: pd.Series) -> str:
    if not bool(row.get("reference_followed")) or pd.isna(row["reference_robust_acc"]):
        return "not the published evaluation"
    if bool(row["flag_above_reference"]):
        return "**above: check the evaluation**"
    # the clean number is comparable even when the attack is stronger: a shortfall points at the model
    clean_high = wilson_interval(round(row["clean_acc"] * row["n"]), int(row["n"]))[1]
    if clean_high < row["reference_clean_acc"]:
        return "clean accuracy below the published: another file, a missing normalisation, or other data?"
    if row["robust_ci_high"] < row["reference_robust_acc"]:
        return "below (a stronger evaluation than the published one)"
    return "agrees (published number within the interval)"


def _percent(value: float | None) -> str:
    return "" if value is None or pd.isna(value) else f"{100 * value:.2f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
