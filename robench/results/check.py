"""Regression checks between two run folders: ``robench check RUN --baseline BASELINE``.

DESIGN.md §1 (use 4): a CI job runs a small benchmark and compares it with committed
baseline numbers; a real drop in robustness must fail the job, noise must not. So a cell
regresses only when its accuracy drops by more than a tolerance (in percentage points)
*and* the drop is statistically significant (DESIGN.md §5):

* an exact McNemar test on the per-sample verdicts when both runs scored the same samples
  (the paired test: a model that loses 5 samples and gains 5 others has not regressed);
* a two-proportion z-test from ``n`` and the accuracies otherwise (e.g. a baseline stored
  without its samples table).

Both tests are one-sided: only a drop is a regression. Cells are paired by
:data:`KEY_COLUMNS`. Cells of the baseline missing from the run, and failed cells, fail the
check too (a damaged cell file, in either folder, counts as a missing cell); cells new in
the run are reported and pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from robench.errors import ConfigError
from robench.execute.numerics import machine_notes
from robench.results.runfolder import RunData, RunFolderError, load_run
from robench.results.runfolder import load_cells as load_cells  # re-exported: report.py reads cells through check
from robench.results.sampling import sampling_notes

KEY_COLUMNS: tuple[str, ...] = (
    "dataset",
    "arch",
    "defense",
    "defense_params",
    "variant",
    "protocol",
    "protocol_spec",
    "norm",
    "eps",
    "seed",
    "sample_seed",
    "n",
)
"""The columns that identify a cell across runs: two runs' cells with equal values are compared.

``batch_size`` and ``shard_size`` are not among them: keyed attacks on deterministic models
give every sample the same verdict at any batch or shard size, so such cells must agree
exactly. Batch-seeded attacks (torchattacks' APGD, Square and AutoAttack seed a whole batch)
and randomized variants draw other numbers when either changes: their cells are still paired,
and the test judges the difference as it judges noise;
:func:`robench.results.sampling.sampling_notes` says so."""


Verdict = Literal["regressed", "failed", "missing", "new", "improved", "ok"]
VERDICTS: tuple[Verdict, ...] = ("regressed", "failed", "missing", "new", "improved", "ok")
FAILING: frozenset[str] = frozenset({"regressed", "failed", "missing"})
"""Verdicts that make the check exit 1."""


@dataclass(frozen=True)
class Metric:
    """One accuracy (robust or clean) of a cell in the baseline and in the run."""

    baseline: float
    run: float
    p_drop: float
    """One-sided p-value of the run being worse than the baseline."""
    p_rise: float
    """One-sided p-value of the run being better."""

    @property
    def delta_points(self) -> float:
        """Run minus baseline, in percentage points."""
        # rounded: accuracies are stored from float32 means, and 1 sample in 100 must be 1.0, not 1.0000001
        return round(100 * (self.run - self.baseline), 6)


@dataclass(frozen=True)
class CellCheck:
    """The verdict on one cell, with the numbers it rests on."""

    cell_id: str
    verdict: Verdict
    reason: str = ""
    test: str = ""
    """``mcnemar`` (paired, same samples), ``z`` (two-proportion) or empty when not compared."""
    robust: Metric | None = None
    clean: Metric | None = None


@dataclass(frozen=True)
class CheckResult:
    """Every cell's verdict, and the settings they were reached with."""

    run: Path
    baseline: Path
    tolerance: float
    alpha: float
    cells: tuple[CellCheck, ...]
    notes: tuple[str, ...] = ()
    """What differs between the two runs' machines (CPU capability, threads, int8 engine)."""
    fail_on_rise: bool = False
    """Whether ``improved`` fails too (evaluation of stored models: a rise means a weaker attack)."""

    @property
    def failing(self) -> frozenset[str]:
        """The verdicts that make this check fail."""
        return FAILING | {"improved"} if self.fail_on_rise else FAILING

    def count(self, verdict: str) -> int:
        """Number of cells with this verdict."""
        return sum(c.verdict == verdict for c in self.cells)

    @property
    def passed(self) -> bool:
        """True when no cell regressed, failed or went missing."""
        return not any(c.verdict in self.failing for c in self.cells)

    @property
    def exit_code(self) -> int:
        """0 when the check passed, 1 otherwise (unusable input raises instead: exit 2)."""
        return 0 if self.passed else 1


def mcnemar_p(baseline: np.ndarray[Any, Any], run: np.ndarray[Any, Any]) -> tuple[float, float]:
    """Exact McNemar test on paired bool verdicts: one-sided p-values (drop, rise).

    Only the discordant pairs carry information: under no change, a sample the baseline got
    right and the run got wrong is as likely as the reverse, so losses ~ Binomial(b + c, 1/2).
    """
    losses = int(np.count_nonzero(baseline & ~run))
    gains = int(np.count_nonzero(~baseline & run))
    if losses + gains == 0:
        return 1.0, 1.0
    drop = stats.binomtest(losses, losses + gains, 0.5, alternative="greater").pvalue
    rise = stats.binomtest(gains, losses + gains, 0.5, alternative="greater").pvalue
    return float(drop), float(rise)


def paired_mean_p(baseline: np.ndarray[Any, Any], run: np.ndarray[Any, Any]) -> tuple[float, float]:
    """One-sided p-values (drop, rise) of a paired t-test on per-sample scores (a corruption
    cell's share of sets classified correctly): the samples are the independent units."""
    diff = run - baseline
    if len(diff) < 2 or not np.any(diff != diff[0]):
        return (1.0, 1.0) if not len(diff) or diff[0] == 0 else ((0.0, 1.0) if diff[0] < 0 else (1.0, 0.0))
    t = float(diff.mean() / (diff.std(ddof=1) / math.sqrt(len(diff))))
    return float(stats.t.sf(-t, len(diff) - 1)), float(stats.t.sf(t, len(diff) - 1))


def two_proportion_p(baseline: float, n_baseline: int, run: float, n_run: int) -> tuple[float, float]:
    """One-sided p-values (drop, rise) of a pooled two-proportion z-test on accuracies."""
    hits_b, hits_r = round(baseline * n_baseline), round(run * n_run)
    pooled = (hits_b + hits_r) / (n_baseline + n_run)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_baseline + 1 / n_run))
    if se == 0:  # both all right or all wrong: no difference to test
        return 1.0, 1.0
    z = (hits_b / n_baseline - hits_r / n_run) / se
    return float(stats.norm.sf(z)), float(stats.norm.sf(-z))


def check(
    run: Path, baseline: Path, tolerance: float = 1.0, alpha: float = 0.05, *, fail_on_rise: bool = False
) -> CheckResult:
    """Compare RUN with BASELINE cell by cell; raises :class:`RunFolderError` on unusable input.

    With ``fail_on_rise`` a significant rise fails as a drop does: for stored models
    evaluated again (``robench run --models``), only the evaluation code can move the
    numbers, and higher robust accuracy then means a weaker attack.
    """
    if tolerance < 0 or not 0 < alpha < 1:
        raise ConfigError(f"--tolerance must be >= 0 and --alpha in (0, 1), got {tolerance} and {alpha}")
    new, old = load_run(run), load_run(baseline)
    unmatched, out = _keyed(new), []
    all_new = list(unmatched)
    for key, row in _keyed(old).items():
        match = unmatched.pop(key, None)
        match = _pop_failed(unmatched, key, row) if match is None else match
        if match is None:
            out.append(CellCheck(str(row["cell_id"]), "missing", _missing_reason(key, all_new, row, new)))
        else:
            out.append(_compare(old, row, new, match, tolerance, alpha))
    if all(c.verdict == "missing" for c in out):
        raise RunFolderError(_nothing_in_common(new, old))
    out += [CellCheck(d.path.name, "missing", f"the baseline's {d.describe()}") for d in old.damaged]
    out += [CellCheck(str(r["cell_id"]), "new", "not in the baseline") for r in unmatched.values()]
    notes = (*machine_notes(new.cells, old.cells), *sampling_notes(new.cells, old.cells))
    return CheckResult(Path(run), Path(baseline), tolerance, alpha, tuple(out), notes, fail_on_rise)


def _keyed(data: RunData) -> dict[tuple[Any, ...], pd.Series]:
    out: dict[tuple[Any, ...], pd.Series] = {}
    for _, row in data.cells.sort_values("cell_id").iterrows():
        if (key := _key(row)) in out:
            raise RunFolderError(f"{data.path}: two cells share the key columns of {row['cell_id']}")
        out[key] = row
    return out


def _key(row: pd.Series, loose: bool = False) -> tuple[Any, ...]:
    # eps is rounded so that 0.1 written by two float paths still pairs
    return tuple(
        round(float(row[c]), 12) if c == "eps" else _spec(row, loose) if c == "protocol_spec" else row[c]
        for c in KEY_COLUMNS
    )


def _spec(row: pd.Series, loose: bool) -> Any:
    """``protocol_spec``; for a deterministic variant (or with ``loose``) without its ``eot`` and
    ``votes``: they cannot move a deterministic model's numbers, so a new default EOT keeps its
    cells paired with a baseline's."""
    spec, randomized = row["protocol_spec"], row.get("randomized")
    if (isinstance(randomized, bool | np.bool_) and bool(randomized) and not loose) or not isinstance(spec, str):
        return spec
    try:
        data = json.loads(spec)
    except json.JSONDecodeError:
        return spec
    if not isinstance(data, dict):
        return spec
    return json.dumps({k: v for k, v in data.items() if k not in ("eot", "votes")}, sort_keys=True)


def _pop_failed(rows: dict[tuple[Any, ...], pd.Series], key: tuple[Any, ...], row: pd.Series) -> pd.Series | None:
    """The cell of ``rows`` that is ``row`` but for ``n`` (and EOT settings), if either failed: a
    failed cell stores no ``n``, nor whether its variant is randomized."""
    i = KEY_COLUMNS.index("n")
    loose = _key(row, loose=True)
    for other_key, other in rows.items():
        failed = row["status"] != "ok" or other["status"] != "ok"
        if failed and _key(other, loose=True)[:i] + _key(other, loose=True)[i + 1 :] == loose[:i] + loose[i + 1 :]:
            return rows.pop(other_key)
    return None


def _differing(a: tuple[Any, ...], b: tuple[Any, ...]) -> list[str]:
    return [c for c, x, y in zip(KEY_COLUMNS, a, b, strict=True) if x != y]


def _nothing_in_common(new: RunData, old: RunData) -> str:
    first_new, first_old = new.cells.iloc[0], old.cells.iloc[0]
    return (
        f"{new.path} and the baseline {old.path} have no cells in common (cells pair on {', '.join(KEY_COLUMNS)}; "
        f"e.g. {first_new['cell_id']} differs from {first_old['cell_id']} in "
        f"{', '.join(_differing(_key(first_new), _key(first_old)))}). Run the baseline's benchmark, or regenerate it"
    )


def _missing_reason(key: tuple[Any, ...], candidates: list[tuple[Any, ...]], row: pd.Series, new: RunData) -> str:
    if any(d.key == row["cell_key"] for d in new.damaged):
        return "in the baseline; the run's cell file is damaged"
    nearest = min((_differing(key, c) for c in candidates), key=len, default=[])
    hint = f"; the closest run cell differs in {', '.join(nearest)}" if nearest else ""
    return f"in the baseline, not in the run{hint}"


def _compare(old: RunData, base: pd.Series, new: RunData, row: pd.Series, tolerance: float, alpha: float) -> CellCheck:
    cell_id = str(row["cell_id"])
    for which, r in (("baseline", base), ("run", row)):
        if r["status"] != "ok":
            return CellCheck(cell_id, "failed", f"{which} cell failed: {r['error']}")
    paired = _paired(old.verdicts, str(base["cell_key"]), new.verdicts, str(row["cell_key"]))
    # a corruption cell's robust_acc is a mean over sets: compare each sample's share of sets, not "all correct"
    robust = "score" if row.get("norm") == "corruption" else "robust"
    metrics = {
        name: _metric(base, row, name, None if paired is None else (paired[0][column], paired[1][column]))
        for name, column in (("robust", robust), ("clean", "clean"))
    }
    worse = [n for n, m in metrics.items() if -m.delta_points > tolerance and m.p_drop < alpha]
    better = [n for n, m in metrics.items() if m.delta_points > tolerance and m.p_rise < alpha]
    verdict: Verdict = "regressed" if worse else "improved" if better else "ok"
    reason = f"{' and '.join(worse or better)} accuracy {'dropped' if worse else 'rose'}" if worse or better else ""
    test = ("paired-t" if robust == "score" else "mcnemar") if paired is not None else "z"
    return CellCheck(cell_id, verdict, reason, test, metrics["robust"], metrics["clean"])


def _paired(
    old: dict[str, pd.DataFrame], old_key: str, new: dict[str, pd.DataFrame], new_key: str
) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Both cells' per-sample verdicts, or None unless they scored the same samples (then: z-test)."""
    a, b = old.get(old_key), new.get(new_key)
    if a is None or b is None or not a.index.equals(b.index) or a.isna().any().any() or b.isna().any().any():
        return None
    return a, b


def _metric(base: pd.Series, row: pd.Series, name: str, samples: tuple[pd.Series, pd.Series] | None) -> Metric:
    b, r = float(base[f"{name}_acc"]), float(row[f"{name}_acc"])
    if samples is None:  # for a corruption mean, conservative: a per-sample share varies less than a verdict
        p_drop, p_rise = two_proportion_p(b, int(base["n"]), r, int(row["n"]))
    elif samples[0].dtype.kind == "f":
        p_drop, p_rise = paired_mean_p(samples[0].to_numpy(float), samples[1].to_numpy(float))
    else:
        p_drop, p_rise = mcnemar_p(samples[0].to_numpy(bool), samples[1].to_numpy(bool))
    return Metric(b, r, p_drop, p_rise)


# -- output: a terminal table, markdown for a CI job summary, JSON for machines -------------

_HEADERS = ("cell", "robust % baseline -> run", "p", "clean % baseline -> run", "p", "test", "verdict")


def _pct(metric: Metric | None, arrow: str) -> tuple[str, str]:
    if metric is None:
        return "", ""
    text = f"{100 * metric.baseline:.1f} {arrow} {100 * metric.run:.1f} ({metric.delta_points:+.1f})"
    return text, f"{metric.p_drop:.3g}"


def _rows(result: CheckResult, arrow: str) -> list[list[str]]:
    rows = []
    for cell in result.cells:
        verdict = f"{cell.verdict}: {cell.reason}" if cell.reason else cell.verdict
        rows.append([cell.cell_id, *_pct(cell.robust, arrow), *_pct(cell.clean, arrow), cell.test, verdict])
    return rows


def summary(result: CheckResult) -> str:
    """One sentence: what was compared, with which settings, and the verdict counts."""
    counts = ", ".join(f"{result.count(v)} {v}" for v in VERDICTS)
    points = "point" if result.tolerance == 1 else "points"
    return (
        f"{len(result.cells)} cells of {result.run} against {result.baseline} (a regression is a drop"
        f"{' or a rise' if result.fail_on_rise else ''} of more than {result.tolerance:g} {points} with one-sided "
        f"p < {result.alpha:g}): {counts}"
    )


def closing_line(result: CheckResult) -> str:
    """``check: N passed, M failed[, K skipped]``: compared cells, failing cells, new (uncompared) ones."""
    failed = sum(result.count(v) for v in result.failing)
    new = result.count("new")
    passed = result.count("ok") + (0 if result.fail_on_rise else result.count("improved"))
    return f"check: {passed} passed, {failed} failed" + (f", {new} skipped" if new else "")


def format_text(result: CheckResult) -> str:
    """The terminal table, the summary and the closing line."""
    rows = [list(_HEADERS), *_rows(result, "->")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADERS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    notes = [f"note: {n}" for n in result.notes]
    return "\n".join([*lines, "", *notes, summary(result), closing_line(result)])


def format_markdown(result: CheckResult) -> str:
    """A GitHub-flavoured markdown summary (for $GITHUB_STEP_SUMMARY)."""
    title = "passed" if result.passed else "FAILED"
    mark = "\u2705" if result.passed else "\u274c"
    head = ["cell", "robust % (baseline \u2192 run)", "p", "clean % (baseline \u2192 run)", "p", "test", "verdict"]
    notes = [*(f"> note: {n}" for n in result.notes), *([""] if result.notes else [])]
    lines = [f"### {mark} robench check {title}", "", summary(result), "", *notes, _md_row(head), _md_row(["---"] * 7)]
    for row in _rows(result, "\u2192"):
        row[0] = f"`{row[0]}`"
        row[-1] = f"**{row[-1]}**" if row[-1].split(":")[0] in result.failing else row[-1]
        lines.append(_md_row(row))
    return "\n".join(lines) + "\n"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def to_json(result: CheckResult) -> str:
    """Every verdict and number, machine-readable."""

    def metric(m: Metric | None) -> dict[str, float] | None:
        return None if m is None else {**dataclasses.asdict(m), "delta_points": m.delta_points}

    cells = [
        {**dataclasses.asdict(c), "test": c.test or None, "robust": metric(c.robust), "clean": metric(c.clean)}
        for c in result.cells
    ]
    data = {
        "run": str(result.run),
        "baseline": str(result.baseline),
        "tolerance_points": result.tolerance,
        "alpha": result.alpha,
        "passed": result.passed,
        "exit_code": result.exit_code,
        "counts": {v: result.count(v) for v in VERDICTS},
        "key_columns": list(KEY_COLUMNS),
        "cells": cells,
        "notes": list(result.notes),
    }
    return json.dumps(data, indent=2)
