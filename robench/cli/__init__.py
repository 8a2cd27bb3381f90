"""The ``robench`` command: run, plan, list, plugins, show, check, report (plus plugin-provided commands)."""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

import robench
from robench.cli.flags import benchmark_options, execution_options, resolve_benchmark, with_execution
from robench.discover.manager import default_plugin_manager, plugin_distributions, plugin_infos
from robench.errors import ConfigError, DamagedFileWarning, RobenchError

if TYPE_CHECKING:
    import pandas as pd

    from robench.discover.registry import Registries
    from robench.plugin import PluginSpec

# Modules that import torch, pandas or pyarrow are imported inside the commands that need
# them: `robench --help`, `--version` and flag errors answer in well under a second.

F = TypeVar("F", bound=Callable[..., Any])
BUILTIN = ("run", "plan", "list", "plugins", "show", "check", "report")


class _Group(click.Group):
    """Adds the commands plugins return from ``robench_commands`` (names must not clash).

    Plugin commands are looked up when a name is not built in; ``--help`` lists the built-in
    commands only, since listing plugin ones means importing every plugin (torch and all):
    seconds instead of a fraction of one. ``robench plugins`` shows which plugin has
    ``robench_commands``.
    """

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, name) or _plugin_commands().get(name)


@functools.cache
def _plugin_commands() -> dict[str, click.Command]:
    out: dict[str, click.Command] = {}
    for commands in default_plugin_manager().hook.robench_commands():
        for command in commands:
            if command.name in BUILTIN or command.name in out:
                raise ConfigError(f"plugin command {command.name!r} clashes with an existing robench command")
            out[str(command.name)] = command
    return out


def _registries() -> Registries:
    from robench.discover.registry import Registries

    return Registries.collect(default_plugin_manager())


def _own_datasets(defenses: Sequence[PluginSpec]) -> tuple[str, ...]:
    """Without --dataset: the dataset the defenses' models are made for, said in one line."""
    from robench.plan.grid import defense_datasets

    found = defense_datasets(_registries(), defenses)
    if found:
        click.echo(f"dataset: {found[0]}, the one the defenses' models are made for (--dataset to choose)", err=True)
    return found


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """robench's version and, like flake8, every plugin distribution's."""
    if not value or ctx.resilient_parsing:
        return
    dists = plugin_distributions()
    click.echo(f"robench, version {robench.__version__} (plugins: {', '.join(f'{d} {v}' for d, v in dists)})")
    ctx.exit()


@click.group(cls=_Group)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show robench's version and its plugin distributions, then exit.",
)
def cli() -> None:
    """robench: adversarial-robustness benchmarks for compact image classifiers.

    Build defended models, attack them all-or-nothing, and write tidy parquet tables.
    Start with `robench run --defense baseline --attack pgd`. Plugins may add commands
    (`robench plugins` lists each plugin's hooks).
    """


_FILE = click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
_SELECT = click.option("-k", "select", default=None, help="Only cells whose id contains this text.")


@cli.command()
@_FILE
@benchmark_options
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to train and attack.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Run folder (default: results/<name>-<config hash>; the name is the file's, or defenses-attacks-dataset).",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Model cache (default: $ROBENCH_CACHE or ~/.cache/robench).",
)
@click.option(
    "--models",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Evaluate the models stored in this folder (a model cache's models/, e.g. a baseline's) and build "
    "none: fails before any compute if one of the grid's models is not there. Transfer sets still go to "
    "--cache-dir.",
)
@click.option(
    "--exhaustive",
    is_flag=True,
    help="Run every version on every sample (no early exit); same accuracies, full per-version outcomes.",
)
@_SELECT
@execution_options
def run(
    device: str,
    out: Path | None,
    cache_dir: Path | None,
    models: Path | None,
    exhaustive: bool,
    select: str | None,
    executor: str | None,
    address: str | None,
    gpus_per_task: float | None,
    cpus_per_task: int | None,
    **opts: Any,
) -> None:
    """Build defenses, attack them, print the table and store it (finished cells are skipped).

    FILE is a benchmark file (benchmarks/*.toml) defining the whole grid; without it, the
    flags do. Example: robench run --defense advt --attack pgd --eps 0.05 --eps 0.1
    """
    benchmark = resolve_benchmark(opts, exhaustive, _own_datasets)  # flag errors first: no torch needed for them
    benchmark = with_execution(benchmark, executor, address, gpus_per_task, cpus_per_task)
    from robench.plan.grid import plan

    plan(benchmark, _registries())  # then plugin names and parameters, before pandas and pyarrow load

    from robench.execute.progress import TqdmProgress
    from robench.execute.runner import run as run_benchmark
    from robench.results.storage import RunStore

    run_dir = out or Path("results") / f"{benchmark.name}-{benchmark.config_hash()}"
    cache = cache_dir or Path(os.environ.get("ROBENCH_CACHE", Path.home() / ".cache" / "robench"))
    summary = run_benchmark(
        benchmark,
        pm=default_plugin_manager(),
        run_dir=run_dir,
        cache_dir=cache,
        device=device,
        progress=TqdmProgress(),
        select=select,
        models=models,
    )
    table = RunStore(run_dir).read_cells()
    click.echo(format_table(table[table["cell_key"].isin([r.row["cell_key"] for r in summary.results])]))
    click.echo(f"\nresults: {run_dir}  ({summary.skipped} cell(s) reused from an earlier run)")
    if summary.failed:
        click.echo(f"{len(summary.failed)} cell(s) failed:", err=True)
        for result in summary.failed:
            click.echo(f"  {result.cell_id}: {result.row['error']}", err=True)
        sys.exit(1)


@cli.command(name="plan")
@_FILE
@benchmark_options
@_SELECT
def plan_cmd(select: str | None, **opts: Any) -> None:
    """Print the cells a run of FILE (or of the flags) would evaluate, without computing anything."""
    from robench.plan.grid import plan, select_cells

    cells = select_cells(plan(resolve_benchmark(opts, own_datasets=_own_datasets), _registries()), select)
    for cell in cells:
        click.echo(cell.id)
    click.echo(f"{len(cells)} cell(s)")


@cli.command(name="list")
@click.argument(
    "kind", required=False, type=click.Choice(["defenses", "attacks", "protocols", "datasets", "architectures"])
)
@click.argument("name", required=False)
def list_cmd(kind: str | None, name: str | None) -> None:
    """List defenses, attacks, protocols, datasets and architectures with the plugin providing each.

    With a KIND and a NAME (`robench list defenses advft`), describe that plugin: its
    documentation, every parameter with its type and default, and its presets.
    """
    registries = _registries()
    if kind and name:
        click.echo(getattr(registries, kind).get(name).describe())
        return
    for name in [kind] if kind else ["defenses", "attacks", "protocols", "datasets", "architectures"]:
        click.echo(f"{name}:")
        for entry_name, entry in getattr(registries, name):
            provider = f"{entry.plugin.display_name} {entry.plugin.version}"
            click.echo(f"  {entry_name:<16} {provider:<36} {_threats(name, entry.cls)}{entry.cls.summary()}")


def _threats(kind: str, cls: Any) -> str:
    """An attack ``--attack`` cannot take (a common corruption has no radius) says how to use it."""
    if kind == "attacks" and not set(cls.norms) & {"linf", "l2"}:
        return f"[{', '.join(sorted(cls.norms))}: use --protocol corruptions] "
    return ""


@cli.command()
def plugins() -> None:
    """Print loaded plugin distributions, versions and hooks as JSON (plugin commands are checked too)."""
    pm = default_plugin_manager()
    _plugin_commands()  # a command clashing with a built-in is reported here, not only when run
    out = []
    for name, info in sorted(plugin_infos(pm).items()):
        hooks = sorted(h.name for h in pm.get_hookcallers(pm.get_plugin(name)) or [])
        out.append({"name": name, "dist": info.dist, "version": info.version, "module": info.module, "hooks": hooks})
    click.echo(json.dumps(out, indent=2))


@cli.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option("--all-columns", is_flag=True, help="Print every column of the cells table.")
@click.option("--schema", is_flag=True, help="Print the documented results schema instead.")
def show(run_dir: Path | None, all_columns: bool, schema: bool) -> None:
    """Print a stored run folder as a table (or the results schema)."""
    from robench.results.parts import unfinished_lines
    from robench.results.storage import RunStore, describe_schema

    if schema:
        for table, column, dtype, doc in describe_schema():
            click.echo(f"{table:<8} {column:<16} {dtype:<22} {doc}")
        return
    if run_dir is None or not ((run_dir / "cells").is_dir() or (run_dir / "parts").is_dir()):
        raise ConfigError(f"{run_dir} is not a robench run folder (it has no cells/ directory)")
    store = RunStore(run_dir)
    cells = store.read_cells()
    if len(cells):
        click.echo(cells.to_string(index=False) if all_columns else format_table(cells))
    for line in unfinished_lines(store, set(cells["cell_key"])):
        click.echo(line)


_RUN_DIR = click.argument("run_dir", type=click.Path(path_type=Path))


@cli.command(name="check")
@_RUN_DIR
@click.option(
    "--baseline",
    required=True,
    type=click.Path(path_type=Path),
    help="Run folder with the reference numbers (e.g. a committed results/baselines/NAME).",
)
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    metavar="POINTS",
    help="Drops of at most this many percentage points never count as regressions.",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.05,
    show_default=True,
    metavar="A",
    help="Significance level of the one-sided test.",
)
@click.option(
    "--fail-on-rise",
    is_flag=True,
    help="A significant rise fails too. For RUN_DIR evaluated on the baseline's stored models (robench run "
    "--models), where only the evaluation code moves numbers and a rise in robust accuracy means a weaker attack.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
@click.option("--markdown", is_flag=True, help="Print a markdown summary (for $GITHUB_STEP_SUMMARY).")
def check_cmd(
    run_dir: Path, baseline: Path, tolerance: float, alpha: float, fail_on_rise: bool, as_json: bool, markdown: bool
) -> None:
    """Fail (exit 1) if RUN_DIR is significantly less robust or accurate than --baseline.

    Cells pair on their key columns. A cell regresses when its robust or clean accuracy drops
    by more than --tolerance points and the drop is significant at --alpha: an exact McNemar
    test on the per-sample verdicts when both runs scored the same samples, else a
    two-proportion z-test. Cells of the baseline missing from RUN_DIR, and failed cells, fail
    the check too (exit 1); new cells are reported. Unusable input (not a run folder, another
    schema version, no cells in common) exits 2.
    """
    from robench.results.check import check, format_markdown, format_text, to_json

    if as_json and markdown:
        raise click.UsageError("--json and --markdown are alternatives: give one")
    result = check(run_dir, baseline, tolerance=tolerance, alpha=alpha, fail_on_rise=fail_on_rise)
    click.echo(to_json(result) if as_json else format_markdown(result) if markdown else format_text(result))
    sys.exit(result.exit_code)


@cli.command(name="report")
@_RUN_DIR
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Report folder (default: RUN_DIR/report).")
def report_cmd(run_dir: Path, out: Path | None) -> None:
    """Write report.md (per protocol: robust accuracy by defense and eps, efficiency) and PNG plots."""
    from robench.results.report import write_report

    written = write_report(run_dir, out)
    for path in written:
        click.echo(str(path))


def format_table(table: pd.DataFrame) -> str:
    """The human-readable results table: key columns and accuracies in percent."""
    import pandas as pd

    if table.empty:
        return "(no cells)"
    t = table.sort_values(["dataset", "arch", "defense", "variant", "protocol", "eps", "seed"])
    view = pd.DataFrame(
        {
            "dataset": t["dataset"],
            "arch": t["arch"],
            "defense": t["defense"],
            "variant": t["variant"],
            "protocol": t["protocol"],
            "norm": t["norm"],
            "eps": t["eps"].map("{:g}".format),
            "seed": t["seed"],
            "n": t["n"],
            "clean %": (100 * t["clean_acc"]).round(1),
            "robust %": (100 * t["robust_acc"]).round(1),
            "95% CI": [
                f"[{100 * lo:.1f}, {100 * hi:.1f}]"
                for lo, hi in zip(t["robust_ci_low"], t["robust_ci_high"], strict=True)
            ],
            "status": t["status"],
        }
    )
    return view.to_string(index=False)


def main() -> None:
    """Console entry point: user errors print a message (exit 2), bugs keep their traceback."""
    with warnings.catch_warnings():
        warnings.simplefilter("default", DamagedFileWarning)  # each damaged file named once, whatever the filters
        warnings.showwarning = _one_line_warning(warnings.showwarning)
        _main()


def _one_line_warning(show: Callable[..., None]) -> Callable[..., None]:
    """``show``, but a :class:`DamagedFileWarning` prints as ``warning: ...`` on stderr, without a source line."""

    def showwarning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, DamagedFileWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            show(message, category, *args, **kwargs)

    return showwarning


def _main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except RobenchError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
