"""The measurements of a cell's row and its per-sample rows, from the engine's outcome."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import torch

from robench.execute.engine import Outcome
from robench.results.metrics import accuracy, count, wilson_interval


def data_hash(indices: torch.Tensor) -> str:
    """Short hash of an evaluation subset."""
    return hashlib.sha256(indices.numpy().tobytes()).hexdigest()[:16]


def scores(out: Outcome, n: int) -> dict[str, Any]:
    """n, clean and robust accuracy with its Wilson interval, and the loss flag."""
    low, high = wilson_interval(count(out.robust), n)
    return {
        "n": n,
        "clean_acc": accuracy(out.clean),
        "robust_acc": accuracy(out.robust),
        "robust_ci_low": low,
        "robust_ci_high": high,
        "flag_loss_not_increasing": bool(out.adv_loss < out.clean_loss) if out.adv_loss else False,
    }


def sample_rows(key: str, indices: torch.Tensor, out: Outcome) -> dict[str, list[Any]]:
    """One row per (sample, version) that ran; version -1 is the clean input."""
    cols: dict[str, list[Any]] = {"cell_key": [], "sample": [], "version": [], "correct": []}
    runs = [(out.clean, torch.ones_like(out.clean)), *zip(out.versions, out.attacked, strict=True)]
    for version, (correct, ran) in enumerate(runs):
        where = ran.nonzero().squeeze(1)
        cols["sample"] += indices[where].tolist()
        cols["correct"] += correct[where].tolist()
        cols["version"] += [version - 1] * len(where)
    cols["cell_key"] = [key] * len(cols["sample"])
    return cols


def now() -> dt.datetime:
    """The current UTC time (timestamps of rows)."""
    return dt.datetime.now(dt.UTC)
