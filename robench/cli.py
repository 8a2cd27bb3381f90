"""The ``robench`` command: run, plan, list, plugins, show (plus plugin-provided commands)."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import pandas as pd
from click.core import ParameterSource

import robench
from robench.benchfile import benchmark_for_command
from robench.config import Benchmark, PluginSpec
from robench.errors import ConfigError, RobenchError
from robench.grid import plan
from robench.pluginmanager import default_plugin_manager, plugin_infos
from robench.registry import Registries
from robench.storage import RunStore, describe_schema

F = TypeVar("F", bound=Callable[..., Any])
BUILTIN = ("run", "plan", "list", "plugins", "show")


class _Group(click.Group):
    """Adds the commands plugins return from ``robench_commands`` (names must not clash)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_plugin_commands()})

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
    return Registries.collect(default_plugin_manager())


def _kv(pairs: Sequence[str]) -> dict[str, Any]:
    """Parse ``key=value`` pairs; values are JSON when they parse as JSON, else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _benchmark_options(func: F) -> F:
    options = [
        click.option(
            "--defense",
            "defenses",
            multiple=True,
            default=("baseline",),
            show_default=True,
            help="Defense plugin to build (repeatable). `robench list defenses` shows them.",
        ),
        click.option(
            "--attack",
            "attacks",
            multiple=True,
            help="Attack plugin (repeatable); its restarts are the versions of a one-attack all-or-nothing "
            "protocol. Default: pgd, unless --protocol is given.",
        ),
        click.option(
            "--protocol",
            "protocols",
            multiple=True,
            help="Named protocol (repeatable), e.g. whitebox-pgd, blackbox-dverge, advft-pgd, autoattack, "
            "eot-pgd, square. `robench list protocols` describes them.",
        ),
        click.option(
            "-P",
            "--protocol-param",
            "protocol_params",
            multiple=True,
            metavar="KEY=VALUE",
            help="Protocol parameter, e.g. -P steps=20, or -P blackbox-dverge.groups=[1,2] (repeatable).",
        ),
        click.option(
            "-D",
            "--defense-param",
            "defense_params",
            multiple=True,
            metavar="KEY=VALUE",
            help="Defense parameter overriding the preset, e.g. -D epochs=5, or for one defense only, "
            "-D advt.eps=0.05 (repeatable).",
        ),
        click.option(
            "-A",
            "--attack-param",
            "attack_params",
            multiple=True,
            metavar="KEY=VALUE",
            help="Attack parameter, e.g. -A steps=50 -A loss=cw, or -A pgd.steps=50 (repeatable).",
        ),
        click.option(
            "--dataset",
            "datasets",
            multiple=True,
            default=("fashion-mnist",),
            show_default=True,
            help="Dataset (repeatable).",
        ),
        click.option(
            "--arch", "archs", multiple=True, default=("cnn8",), show_default=True, help="Architecture (repeatable)."
        ),
        click.option(
            "--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True, help="Threat norm."
        ),
        click.option(
            "--eps",
            "eps",
            multiple=True,
            type=float,
            help="Threat radius in [0, 1] pixel units (repeatable); default: the dataset's "
            "(fashion-mnist 0.1, cifar 8/255 for linf).",
        ),
        click.option(
            "--seed",
            "seeds",
            multiple=True,
            type=int,
            default=(0,),
            show_default=True,
            help="Seed of training and attack starts (repeatable).",
        ),
        click.option(
            "--preset",
            type=click.Choice(["smoke", "paper"]),
            default="smoke",
            show_default=True,
            help="Defense hyperparameters: smoke (CPU minutes) or paper (the papers', for GPUs).",
        ),
        click.option(
            "--n-samples",
            type=int,
            default=1000,
            show_default=True,
            help="Evaluation subset size, drawn reproducibly from the test split.",
        ),
        click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed of that subset."),
        click.option(
            "--batch-size",
            type=int,
            default=250,
            show_default=True,
            help="Attack batch size (results do not depend on it).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _benchmark(opts: dict[str, Any], exhaustive: bool = False) -> Benchmark:
    dparams, aparams, pparams = _kv(opts["defense_params"]), _kv(opts["attack_params"]), _kv(opts["protocol_params"])
    attacks = opts["attacks"] or (() if opts["protocols"] else ("pgd",))
    name = "-".join([*opts["defenses"], *attacks, *opts["protocols"], *opts["datasets"]])
    _check_scopes(dparams, opts["defenses"], "-D")
    _check_scopes(aparams, attacks, "-A")
    _check_scopes(pparams, opts["protocols"], "-P")
    return Benchmark(
        name=re.sub(r"[^A-Za-z0-9_.-]+", "_", name),
        datasets=tuple(opts["datasets"]),
        archs=tuple(opts["archs"]),
        defenses=tuple(PluginSpec.of(d, _scoped(dparams, d)) for d in opts["defenses"]),
        attacks=tuple(PluginSpec.of(a, _scoped(aparams, a)) for a in attacks),
        protocols=tuple(PluginSpec.of(p, _scoped(pparams, p)) for p in opts["protocols"]),
        norm=opts["norm"],
        eps=tuple(opts["eps"]),
        seeds=tuple(opts["seeds"]),
        preset=opts["preset"],
        n_samples=opts["n_samples"],
        sample_seed=opts["sample_seed"],
        batch_size=opts["batch_size"],
        exhaustive=exhaustive,
    )


def _resolve(opts: dict[str, Any], exhaustive: bool = False) -> Benchmark:
    """The benchmark of the FILE argument (--batch-size, if given, overrides its own) or of the flags."""
    file: Path | None = opts.pop("file")
    if file is None:
        return _benchmark(opts, exhaustive)
    ctx, cmdline = click.get_current_context(), ParameterSource.COMMANDLINE
    given = {p.name: max(p.opts, key=len) for p in ctx.command.params if p.name in opts}
    given = {name: flag for name, flag in given.items() if ctx.get_parameter_source(str(name)) is cmdline}
    batch_size = opts["batch_size"] if given.pop("batch_size", None) else None
    return benchmark_for_command(file, list(given.values()), batch_size, exhaustive)


def _scoped(params: dict[str, Any], plugin: str) -> dict[str, Any]:
    """Parameters for ``plugin``: unscoped ``key`` apply to every plugin, ``plugin.key`` to one."""
    out = {k: v for k, v in params.items() if "." not in k}
    out.update({k.split(".", 1)[1]: v for k, v in params.items() if k.split(".", 1)[0] == plugin and "." in k})
    return out


def _check_scopes(params: dict[str, Any], plugins: Sequence[str], flag: str) -> None:
    for key in params:
        scope = key.split(".", 1)[0] if "." in key else None
        if scope is not None and scope not in plugins:
            raise ConfigError(
                f"{flag} {key}=...: {scope!r} is not one of the plugins in this run ({', '.join(plugins)})"
            )


@click.group(cls=_Group)
@click.version_option(robench.__version__, prog_name="robench")
def cli() -> None:
    """robench: adversarial-robustness benchmarks for compact image classifiers.

    Build defended models, attack them all-or-nothing, and write tidy parquet tables.
    Start with `robench run --defense baseline --attack pgd`.
    """


_FILE = click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
_SELECT = click.option("-k", "select", default=None, help="Only cells whose id contains this text.")


@cli.command()
@_FILE
@_benchmark_options
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
    "--exhaustive",
    is_flag=True,
    help="Run every version on every sample (no early exit); same accuracies, full per-version outcomes.",
)
@_SELECT
def run(
    device: str, out: Path | None, cache_dir: Path | None, exhaustive: bool, select: str | None, **opts: Any
) -> None:
    """Build defenses, attack them, print the table and store it (finished cells are skipped).

    FILE is a benchmark file (benchmarks/*.toml) defining the whole grid; without it, the
    flags do. Example: robench run --defense advt --attack pgd --eps 0.05 --eps 0.1
    """
    from robench.progress import TqdmProgress
    from robench.runner import run as run_benchmark

    benchmark = _resolve(opts, exhaustive)
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
@_benchmark_options
@_SELECT
def plan_cmd(select: str | None, **opts: Any) -> None:
    """Print the cells a run of FILE (or of the flags) would evaluate, without computing anything."""
    cells = [c for c in plan(_resolve(opts), _registries()) if not select or select in c.id]
    for cell in cells:
        click.echo(cell.id)
    click.echo(f"{len(cells)} cell(s)")


@cli.command(name="list")
@click.argument(
    "kind", required=False, type=click.Choice(["defenses", "attacks", "protocols", "datasets", "architectures"])
)
def list_cmd(kind: str | None) -> None:
    """List defenses, attacks, protocols, datasets and architectures with the plugin providing each."""
    registries = _registries()
    for name in [kind] if kind else ["defenses", "attacks", "protocols", "datasets", "architectures"]:
        click.echo(f"{name}:")
        for entry_name, entry in getattr(registries, name):
            provider = f"{entry.plugin.display_name} {entry.plugin.version}"
            click.echo(f"  {entry_name:<16} {provider:<36} {entry.cls.summary()}")


@cli.command()
def plugins() -> None:
    """Print loaded plugin distributions, versions and hooks as JSON."""
    pm = default_plugin_manager()
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
    if schema:
        for table, column, dtype, doc in describe_schema():
            click.echo(f"{table:<8} {column:<16} {dtype:<22} {doc}")
        return
    if run_dir is None or not (run_dir / "cells").is_dir():
        raise ConfigError(f"{run_dir} is not a robench run folder (it has no cells/ directory)")
    cells = RunStore(run_dir).read_cells()
    click.echo(cells.to_string(index=False) if all_columns else format_table(cells))


def format_table(table: pd.DataFrame) -> str:
    """The human-readable results table: key columns and accuracies in percent."""
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
