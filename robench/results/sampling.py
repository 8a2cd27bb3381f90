"""What another attack batch or shard size means for a regression check (``robench check``).

Keyed attacks on deterministic models give every sample the same verdict at any batch or shard
size. Batch-seeded attacks and randomized variants draw other numbers when either changes:
their cells are still paired, and the check notes the difference instead of hiding it.
"""

from __future__ import annotations

import pandas as pd

SAMPLING_COLUMNS = {"batch_size": "attack batch size", "shard_size": "shard size"}
"""Row columns that change the draws of batch-seeded attacks and random models (not the key)."""


def sampling_notes(run: pd.DataFrame, baseline: pd.DataFrame) -> tuple[str, ...]:
    """A note when the runs used another batch or shard size (where both recorded it)."""
    notes = []
    for column, label in SAMPLING_COLUMNS.items():
        if column not in run or column not in baseline or run[column].isna().all() or baseline[column].isna().all():
            continue  # a run folder of an older robench: not recorded
        old, new = sorted(set(baseline[column].dropna().astype(int))), sorted(set(run[column].dropna().astype(int)))
        if old != new:
            notes.append(f"{label}: baseline {old}, run {new}")
    if notes:
        notes.append(
            "keyed attacks on deterministic models give the same verdicts at any batch or shard size; batch-seeded "
            "attacks (apgd, square, autoattack) and randomized variants draw other numbers, compared as noise"
        )
    return tuple(notes)
