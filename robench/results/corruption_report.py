"""The report section of common-corruption cells (norm ``corruption``): no eps axis, so instead
of robust accuracy against eps, a table of RobustBench's corruption accuracy with its
per-severity means and worst corruption, accuracy against severity (one line per model
variant, severity 0 = clean), and a corruption x defense heat map of the accuracy averaged
over severities. Called by :func:`robench.results.report.write_report`.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from robench.results.figures import figure, slug

SERIES = ["dataset", "arch", "defense_label", "variant", "seed"]
SEVERITY_COLUMNS = [f"corruption_s{s}_acc" for s in range(1, 6)]


def is_corruption(cells: pd.DataFrame) -> bool:
    """Whether ``cells`` (one protocol's) are corruption cells."""
    return bool(len(cells)) and bool((cells["norm"] == "corruption").all())


def corruption_report(protocol: str, cells: pd.DataFrame, out: Path) -> tuple[list[str], list[Path]]:
    """The markdown lines and the two plots (severity curve, heat map) of one corruption protocol."""
    lines = [
        f"## {protocol}: common corruptions",
        "",
        "Corruption accuracy is RobustBench's metric: the plain accuracy averaged over every "
        "(corruption, severity) set, with a 95 % normal interval over samples; s1-s5 average over the "
        "corruptions at one severity; worst is the corruption with the lowest accuracy over severities.",
        "",
    ]
    for (dataset, arch), group in cells.groupby(["dataset", "arch"], sort=True):
        head = ["defense", "variant", "seed", "clean %", "corruption %", "s1", "s2", "s3", "s4", "s5", "worst"]
        lines += [f"### {dataset}, {arch}", "", _row(head), _row(["---"] * len(head))]
        for _, series in group.groupby(SERIES, sort=True):
            c = series.iloc[0]
            lines.append(
                _row(
                    [
                        f"`{c['defense_label']}`",
                        str(c["variant"]),
                        str(c["seed"]),
                        f"{100 * c['clean_acc']:.1f}",
                        f"{_pct(c['robust_acc'])} [{_pct(c['robust_ci_low'])}, {_pct(c['robust_ci_high'])}]",
                        *(_pct(c[col]) for col in SEVERITY_COLUMNS),
                        f"{c['corruption_worst']} ({_pct(c['corruption_worst_acc'])})",
                    ]
                )
            )
        lines.append("")
    plots = [plot_severity(protocol, cells, out), plot_heatmap(protocol, cells, out)]
    lines += [f"![accuracy by severity]({plots[0].name})\n", f"![corruption x defense]({plots[1].name})\n"]
    return lines, plots


def plot_severity(protocol: str, cells: pd.DataFrame, out: Path) -> Path:
    """Accuracy against severity (0 = clean, then each severity's mean over corruptions), per variant."""
    fig = figure()
    ax = fig.add_subplot()
    labels = _labels(cells)
    for i, (key, series) in enumerate(cells.groupby(SERIES, sort=True)):
        c = series.iloc[0]
        accs = [100 * float(c["clean_acc"]), *(100 * float(c[col]) for col in SEVERITY_COLUMNS)]
        ax.plot(range(6), accs, marker="osD^vPX*"[i % 8], alpha=0.85, label=labels[key])
    ax.set(xlabel="severity (0 = clean)", ylabel="accuracy (%)", ylim=(-2, 102), xticks=range(6))
    ax.set_title(f"{protocol}: accuracy by severity (mean over corruptions)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out / f"accuracy-vs-severity-{slug(protocol)}.png"
    fig.savefig(path)
    return path


def plot_heatmap(protocol: str, cells: pd.DataFrame, out: Path) -> Path:
    """Corruption x defense (model variant) heat map of the accuracy averaged over severities."""
    labels = _labels(cells)
    columns: list[str] = []
    table: dict[str, list[float]] = {}
    for key, series in cells.groupby(SERIES, sort=True):
        columns.append(labels[key])
        for name, accs in json.loads(str(series.iloc[0]["corruption_table"])).items():
            table.setdefault(name, [np.nan] * (len(columns) - 1)).append(100 * float(np.mean(accs)))
        for values in table.values():  # a corruption this cell lacks: a blank square
            values.extend([np.nan] * (len(columns) - len(values)))
    names = list(table)
    grid = np.array([table[n] for n in names])
    fig = figure((2.5 + 1.1 * len(columns), 1.2 + 0.32 * len(names)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (r, c), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(c, r, f"{value:.0f}", ha="center", va="center", fontsize=7, color="w" if value < 60 else "k")
    ax.set_xticks(range(len(columns)), [textwrap.fill(c, 18) for c in columns], fontsize=7, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title(f"{protocol}: accuracy (%) by corruption, mean over severities", fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    path = out / f"corruption-heatmap-{slug(protocol)}.png"
    fig.savefig(path)
    return path


def _labels(cells: pd.DataFrame) -> dict[tuple[object, ...], str]:
    """Legend labels: the parts of the series key that vary, defense label at least."""
    keys = [k if isinstance(k, tuple) else (k,) for k in cells.groupby(SERIES, sort=True).groups]
    varying = [i for i in range(len(SERIES)) if len({k[i] for k in keys}) > 1] or [SERIES.index("defense_label")]
    return {k: " ".join(("seed " if SERIES[i] == "seed" else "") + str(k[i]) for i in varying) for k in keys}


def _pct(value: float | None) -> str:
    return "" if value is None or pd.isna(value) else f"{100 * float(value):.1f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
