"""A readable report of one run folder: ``robench report RUN [--out DIR]``.

Writes ``report.md`` (per protocol, a table of robust accuracy by defense and eps with its
Wilson interval, next to clean accuracy and the efficiency columns; what the model checks
found; sanity flags; failed cells) and PNG plots: robust accuracy against eps, one figure
per protocol (as in the EIO paper's Fig. 4, with the 95 % intervals as error bars), and,
for defenses with several variants, robust accuracy against model size and MACs. Plots use
matplotlib's object API with the Agg canvas, so no display and no pyplot global state are
involved.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from robench.results.check import load_cells
from robench.results.corruption_report import corruption_report, is_corruption
from robench.results.figures import figure, slug
from robench.results.indicator_report import indicators_section
from robench.results.reference_report import reference_section
from robench.results.storage import describe_schema

SECTION = ["protocol_label", "dataset", "arch", "norm"]
"""One table per protocol (as labelled in the cell id, parameters included), dataset, arch and norm."""
SERIES = ["dataset", "arch", "defense_label", "variant", "seed"]
"""One table row, and one plotted line, per model variant."""
MARKERS = "osD^vPX*"
"""Markers cycle with the colours, so overlapping lines stay tellable apart."""


SIZE_AXES = {"model_bytes": "model size", "macs": "MACs"}
"""Columns robust accuracy is drawn against, for models with variants of several sizes (a
pruned model's variants differ in bytes only, a ProARD family's in MACs too)."""
SIZE_LABELS = {"model_bytes": "model size (bytes of weights)", "macs": "multiply-accumulates per image"}


def write_report(run: Path, out: Path | None = None) -> list[Path]:
    """Write ``report.md`` and the plots of run folder ``run`` into ``out`` (default ``run/report``).

    :returns: the written files, report.md first
    """
    cells = _labelled(load_cells(run))
    out = Path(out) if out is not None else Path(run) / "report"
    out.mkdir(parents=True, exist_ok=True)
    ok = cells[cells["status"] == "ok"]
    lines = _header(Path(run), cells)
    plots: list[Path] = []
    for protocol, group in ok.groupby("protocol_label", sort=True):
        if is_corruption(group):  # no eps axis: accuracy by severity and a corruption x defense map
            section, figures = corruption_report(str(protocol), group, out)
            lines, plots = lines + section, plots + figures
            continue
        lines += _protocol_section(str(protocol), group)
        plots.append(_plot_eps(str(protocol), group, out))
        lines.append(f"![robust accuracy against eps]({plots[-1].name})\n")
        for column, what in SIZE_AXES.items():
            size_plot = _plot_size(str(protocol), group, out, column)
            if size_plot is not None:
                plots.append(size_plot)
                lines.append(f"![robust accuracy against {what}]({size_plot.name})\n")
    lines += reference_section(ok) + _checks_section(ok) + indicators_section(ok) + _flags_section(ok)
    lines += _failed_section(cells)
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return [report, *plots]


def _labelled(cells: pd.DataFrame) -> pd.DataFrame:
    """Add the readable defense and protocol labels (with their parameters) from the cell ids.

    A cell id is ``dataset/arch/<defense label>/variant/<protocol label>/norm/eps=../seed=..``.
    """
    out = cells.copy()
    parts = [str(i).split("/") for i in cells["cell_id"]]
    defense, protocol = list(cells["defense"]), list(cells["protocol"])
    out["defense_label"] = ["/".join(p[2:-5]) if len(p) >= 8 else d for p, d in zip(parts, defense, strict=True)]
    out["protocol_label"] = [p[-4] if len(p) >= 8 else q for p, q in zip(parts, protocol, strict=True)]
    return out


def _header(run: Path, cells: pd.DataFrame) -> list[str]:
    first = cells.iloc[0]
    failed = int((cells["status"] != "ok").sum())
    return [
        f"# robench report: {run.name}",
        "",
        f"Run folder `{run}`: {len(cells)} cells ({failed} failed), robench {first['robench_version']}, "
        f"git {str(first['git_revision'])[:12] or 'unknown'}, config {first['config_hash']}, "
        f"device {', '.join(sorted(set(cells['device'].astype(str))))}.",
        "",
        "Accuracies in %. Robust accuracy is all-or-nothing (correct on the clean input and under every "
        "version of the protocol; corruption protocols: the mean over their sets), with its 95 % interval in "
        "brackets. Efficiency: parameters, "
        "non-zero parameters, weight storage, multiply-accumulates per image, median single-image latency.",
        "",
    ]


def _protocol_section(protocol: str, cells: pd.DataFrame) -> list[str]:
    lines: list[str] = []
    for (_, dataset, arch, norm), group in cells.groupby(SECTION, sort=True):
        eps_values = sorted(group["eps"].unique())
        lines += [f"## {protocol}: {dataset}, {arch}, {norm}", ""]
        head = ["defense", "variant", "seed", "clean %", *(f"eps {e:g}" for e in eps_values)]
        head += ["params", "nonzero", "model size", "MACs", "latency ms"]
        lines += [_md_row(head), _md_row(["---"] * len(head))]
        for _, series in group.groupby(SERIES, sort=True):
            lines.append(_md_row(_table_row(series, eps_values)))
        lines.append("")
    return lines


def _table_row(series: pd.DataFrame, eps_values: list[float]) -> list[str]:
    first = series.iloc[0]
    by_eps = series.set_index("eps")
    accs = []
    for eps in eps_values:
        if eps not in by_eps.index:
            accs.append("")
            continue
        c = by_eps.loc[eps]
        accs.append(f"{100 * c['robust_acc']:.1f} [{100 * c['robust_ci_low']:.1f}, {100 * c['robust_ci_high']:.1f}]")
    return [
        f"`{first['defense_label']}`",
        str(first["variant"]),
        str(first["seed"]),
        f"{100 * series['clean_acc'].mean():.1f}",
        *accs,
        f"{int(first['params']):,}",
        f"{int(first['nonzero_params']):,}",
        _bytes(int(first["model_bytes"])),
        _si(float(first["macs"])),
        f"{series['latency_ms'].median():.2f}",
    ]


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _si(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _md_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _checks_section(cells: pd.DataFrame) -> list[str]:
    """What the model checks found, cell by cell where they fired, and what they cost."""
    lines = ["## Model checks", ""]
    ran = cells[cells["checks"].notna()] if "checks" in cells else cells.iloc[:0]
    if ran.empty:
        return [*lines, "Not run: these cells come from a robench without model checks.", ""]
    share = ran["check_seconds"].sum() / max((ran["check_seconds"] + ran["attack_seconds"]).sum(), 1e-9)
    lines += [
        f"Run before every attack on the first {int(ran['check_samples'].max())} samples of each cell: output "
        "contract, probability outputs, randomness, vanishing gradients, no gradient path, batch dependence. They took "
        f"{ran['check_seconds'].sum():.2f} s, {100 * share:.2f} % of the cells' evaluation time. "
        f"{int((ran['checks'] == 'ok').sum())} of {len(ran)} cells: ok.",
        "",
    ]
    for _, row in ran[ran["checks"] != "ok"].sort_values("cell_id").iterrows():
        text = f"- `{row['cell_id']}`: {row['checks']}"
        if row["masking_found_by"]:
            found = json.loads(row["masking_found_by"])
            text += "; samples the added versions fooled: " + ", ".join(f"`{k}` {v}" for k, v in found.items())
        if isinstance(row.get("no_gradient_reason"), str) and row["no_gradient_reason"]:
            text += f"; no gradient path: {row['no_gradient_reason']}, skipped {row['skipped_versions']}"
        lines.append(text)
    for _, row in ran[ran["bpda"].fillna("") != ""].sort_values("cell_id").iterrows():
        lines.append(f"- `{row['cell_id']}`: attacked through its declared preprocessing by BPDA ({row['bpda']})")
    if len(cells) > len(ran):
        lines.append(f"- {len(cells) - len(ran)} cells come from a robench without model checks.")
    return [*lines, ""]


def _flags_section(cells: pd.DataFrame) -> list[str]:
    docs = {column: doc for table, column, _, doc in describe_schema() if column.startswith("flag_")}
    lines = ["## Sanity flags", ""]
    for _, row in cells.sort_values("cell_id").iterrows():
        raised = [f for f in docs if not pd.isna(row[f]) and bool(row[f])]
        lines += [f"- `{row['cell_id']}`: {f} ({docs[f].split(': ', 1)[-1]})" for f in raised]
    if len(lines) == 2:
        lines.append("None raised.")
    return [*lines, ""]


def _failed_section(cells: pd.DataFrame) -> list[str]:
    failed = cells[cells["status"] != "ok"].sort_values("cell_id")
    if failed.empty:
        return []
    return ["## Failed cells", "", *(f"- `{r['cell_id']}`: {r['error']}" for _, r in failed.iterrows()), ""]


def _series_labels(cells: pd.DataFrame, columns: list[str]) -> dict[tuple[object, ...], str]:
    """Short legend labels: only the parts of ``columns`` that vary within the figure."""
    keys = [k if isinstance(k, tuple) else (k,) for k in cells.groupby(columns, sort=True).groups]
    varying = [i for i in range(len(columns)) if len({k[i] for k in keys}) > 1] or [columns.index("defense_label")]
    prefix = {"seed": "seed ", "eps": "eps "}
    # wrapped: a defense label lists its parameters and can be wider than the axes
    return {k: textwrap.fill(" ".join(f"{prefix.get(columns[i], '')}{k[i]}" for i in varying), 70) for k in keys}


def _plot_eps(protocol: str, cells: pd.DataFrame, out: Path) -> Path:
    """Robust accuracy against eps, one line per model variant, Wilson intervals as error bars."""
    fig = figure()
    ax = fig.add_subplot()
    labels = _series_labels(cells, SERIES)
    for i, (key, series) in enumerate(cells.groupby(SERIES, sort=True)):
        s = series.sort_values("eps")
        acc, low, high = 100 * s["robust_acc"], 100 * s["robust_ci_low"], 100 * s["robust_ci_high"]
        yerr = [(acc - low).clip(lower=0), (high - acc).clip(lower=0)]
        marker = MARKERS[i % len(MARKERS)]
        ax.errorbar(s["eps"], acc, yerr=yerr, marker=marker, capsize=3, alpha=0.85, label=labels[key])
    norms = "/".join(sorted({"Linf" if n == "linf" else "L2" for n in cells["norm"]}))
    ax.set(xlabel=f"eps ({norms} radius, pixel units)", ylabel="robust accuracy (%)", ylim=(-2, 102))
    ax.set_title(f"{protocol}: all-or-nothing robust accuracy (95 % Wilson intervals)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out / f"robust-vs-eps-{slug(protocol)}.png"
    fig.savefig(path)
    return path


def _plot_size(protocol: str, cells: pd.DataFrame, out: Path, column: str = "model_bytes") -> Path | None:
    """Robust accuracy against ``column`` (a :data:`SIZE_AXES` key) for defenses with several
    variants that differ in it; None if there are none."""
    model = ["dataset", "arch", "defense_label", "seed"]
    several = cells.groupby(model)[column].transform("nunique") > 1
    if not several.any():
        return None
    fig = figure()
    ax = fig.add_subplot()
    columns = [*model, "eps"]
    labels = _series_labels(cells[several], columns)
    annotated: set[tuple[object, ...]] = set()
    for i, (key, series) in enumerate(cells[several].groupby(columns, sort=True)):
        s = series.sort_values(column)
        acc = 100 * s["robust_acc"]
        yerr = [(acc - 100 * s["robust_ci_low"]).clip(lower=0), (100 * s["robust_ci_high"] - acc).clip(lower=0)]
        marker = MARKERS[i % len(MARKERS)]
        ax.errorbar(s[column], acc, yerr=yerr, marker=marker, capsize=3, alpha=0.85, label=labels[key])
        if key[:-1] not in annotated:  # name each variant once per model, not once per eps
            annotated.add(key[:-1])
            for x, y, name in zip(s[column], acc, s["variant"], strict=True):
                ax.annotate(str(name), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if cells.loc[several, column].max() > 10 * cells.loc[several, column].min():
        ax.set_xscale("log")
    ax.set(xlabel=SIZE_LABELS[column], ylabel="robust accuracy (%)", ylim=(-2, 102))
    ax.set_title(f"{protocol}: robust accuracy against {SIZE_AXES[column]}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out / f"accuracy-vs-{'size' if column == 'model_bytes' else column}-{slug(protocol)}.png"
    fig.savefig(path)
    return path
