"""Sanity flags across the cells of a run (after Carlini et al.'s evaluation checklist).

A flag is a column, never an exception: it marks a number a reviewer should distrust.
Per-cell flags are set by the session; the ones that compare cells are set here, after
the run, over the whole table.
"""

from __future__ import annotations

import pandas as pd

from robench.results.storage import CROSS_CELL_FLAGS, RunStore

LARGE_EPS = 0.5  # Linf 0.5 can turn any [0, 1] image into flat grey
MODEL_COLUMNS = ["dataset", "arch", "defense", "defense_params", "seed", "variant"]


def compute_flags(table: pd.DataFrame) -> pd.DataFrame:
    """The table with every cross-cell flag recomputed (rows with status ``ok`` only)."""
    out = table.copy()
    ok = out["status"] == "ok"
    out["flag_eps_not_monotonic"] = False
    out["flag_whitebox_above_transfer"] = False
    out["flag_large_eps_survives"] = (
        ok & (out["norm"] == "linf") & (out["eps"] >= LARGE_EPS) & (out["robust_acc"] > 0.2)
    )
    out["flag_randomized_without_eot"] = ok & out["randomized"].fillna(False).astype(bool) & (out["eot"].fillna(0) <= 1)
    for _, group in out[ok].groupby([*MODEL_COLUMNS, "protocol", "norm"], dropna=False):
        ordered = group.sort_values("eps")
        # more than one sample of slack: a single borderline sample is noise, not a trend
        rises = ordered["robust_acc"].diff() > 1.5 / ordered["n"]
        out.loc[ordered.index[rises.to_numpy()], "flag_eps_not_monotonic"] = True
    for _, group in out[ok].groupby([*MODEL_COLUMNS, "norm", "eps"], dropna=False):
        transfer = group[group["transfer"].astype(bool)]
        if transfer.empty:
            continue
        white = group[~group["transfer"].astype(bool)]
        above = white["robust_acc"] > transfer["robust_acc"].min() + 1.5 / white["n"]
        out.loc[white.index[above.to_numpy()], "flag_whitebox_above_transfer"] = True
    return out


def update_flags(store: RunStore) -> None:
    """Recompute the cross-cell flags of a run folder and store the rows that changed."""
    table = store.read_cells()
    if table.empty:
        return
    flagged = compute_flags(table)
    columns = list(CROSS_CELL_FLAGS)
    changed = (flagged[columns].fillna(False) != table[columns].fillna(False)).any(axis=1)
    if changed.any():
        store.rewrite_cells(flagged[changed])
