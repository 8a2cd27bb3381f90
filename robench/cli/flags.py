"""Command-line flags that describe a benchmark grid, and turning them into a :class:`Benchmark`.

Kept apart from ``cli.py`` so the commands stay short; ``run`` and ``plan`` share these flags.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from robench.errors import ConfigError
from robench.plan.benchfile import benchmark_for_command
from robench.plan.config import DEFAULT_DATASET, DEFAULT_SHARD_SIZE, Benchmark
from robench.plan.execution import with_overrides
from robench.plugin import PluginSpec

F = TypeVar("F", bound=Callable[..., Any])
OwnDatasets = Callable[[Sequence[PluginSpec]], tuple[str, ...]]
"""Defense specs -> the datasets their models are made for (see :func:`resolve_benchmark`)."""


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


def benchmark_options(func: F) -> F:
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
            help="Protocol parameter, e.g. -P steps=20, or -P blackbox-dverge.groups=[1,2] (repeatable). Every "
            "protocol, --attack's one-attack ones included, takes eot and votes (randomized variants: -P eot=40).",
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
            help=f"Dataset (repeatable). Default: the dataset the defenses' models are made for, where their "
            f"parameters fix one (a RobustBench model: the one it was published for), else {DEFAULT_DATASET}.",
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
            help="Evaluation subset size, drawn reproducibly from the test split. More than the split holds "
            "is an error; its size (fashion-mnist, cifar: 10000) evaluates the whole split.",
        ),
        click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed of that subset."),
        click.option(
            "--sample-order",
            type=click.Choice(["random", "first"]),
            default="random",
            show_default=True,
            help="random: the subset is drawn with --sample-seed. first: the first --n-samples test images in "
            "order, as RobustBench's leaderboard (--protocol robustbench) evaluates. In a benchmark file: "
            "[evaluation] sample_order.",
        ),
        click.option(
            "--batch-size",
            type=int,
            default=250,
            show_default=True,
            help="Attack batch size. Keyed attacks on deterministic models give the same numbers at any batch "
            "size; batch-seeded attacks (apgd, square, autoattack) and random models give another draw (recorded "
            "in every row).",
        ),
        click.option(
            "--shard-size",
            type=click.IntRange(min=1),
            default=DEFAULT_SHARD_SIZE,
            show_default=True,
            help="Samples per shard: a cell's subset is evaluated (and stored, and resumed) in shards of at most "
            "this many samples, the unit of work the Ray executor spreads over devices. Like --batch-size: "
            "the same numbers for keyed attacks on deterministic models, another draw otherwise.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _benchmark(opts: dict[str, Any], exhaustive: bool = False, own_datasets: OwnDatasets | None = None) -> Benchmark:
    dparams, aparams, pparams = _kv(opts["defense_params"]), _kv(opts["attack_params"]), _kv(opts["protocol_params"])
    attacks = opts["attacks"] or (() if opts["protocols"] else ("pgd",))
    _check_scopes(dparams, opts["defenses"], "-D")
    _check_scopes(aparams, attacks, "-A")
    _check_scopes(pparams, [*opts["protocols"], *attacks], "-P")
    defenses = tuple(PluginSpec.of(d, _scoped(dparams, d)) for d in opts["defenses"])
    datasets = tuple(opts["datasets"]) or (own_datasets(defenses) if own_datasets else ()) or (DEFAULT_DATASET,)
    name = "-".join([*opts["defenses"], *attacks, *opts["protocols"], *datasets])
    return Benchmark(
        name=re.sub(r"[^A-Za-z0-9_.-]+", "_", name),
        datasets=datasets,
        archs=tuple(opts["archs"]),
        defenses=defenses,
        attacks=tuple(PluginSpec.of(a, _scoped(aparams, a)) for a in attacks),
        protocols=tuple(PluginSpec.of(p, _scoped(pparams, p)) for p in opts["protocols"]),
        # -P applies to the one-attack protocols of --attack too: eot and votes, checked by plan()
        attack_settings=tuple(PluginSpec.of(a, ps) for a in dict.fromkeys(attacks) if (ps := _scoped(pparams, a))),
        norm=opts["norm"],
        eps=tuple(opts["eps"]),
        seeds=tuple(opts["seeds"]),
        preset=opts["preset"],
        n_samples=opts["n_samples"],
        sample_seed=opts["sample_seed"],
        sample_order=opts["sample_order"],
        batch_size=opts["batch_size"],
        shard_size=opts["shard_size"],
        exhaustive=exhaustive,
    )


def resolve_benchmark(
    opts: dict[str, Any], exhaustive: bool = False, own_datasets: OwnDatasets | None = None
) -> Benchmark:
    """The benchmark of the FILE argument (--batch-size and --shard-size, if given, override its own) or
    of the flags.

    :param own_datasets: without --dataset, the datasets the flags' defenses are made for
        (:func:`robench.plan.grid.defense_datasets`); empty, or not given: the default dataset
    """
    file: Path | None = opts.pop("file")
    if file is None:
        return _benchmark(opts, exhaustive, own_datasets)
    ctx, cmdline = click.get_current_context(), ParameterSource.COMMANDLINE
    given = {p.name: max(p.opts, key=len) for p in ctx.command.params if p.name in opts}
    given = {name: flag for name, flag in given.items() if ctx.get_parameter_source(str(name)) is cmdline}
    batch_size = opts["batch_size"] if given.pop("batch_size", None) else None
    shard_size = opts["shard_size"] if given.pop("shard_size", None) else None
    return benchmark_for_command(file, list(given.values()), batch_size, exhaustive, shard_size)


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


_EXECUTION_OPTIONS = (
    click.option(
        "--executor",
        type=click.Choice(["local", "ray"]),
        default=None,
        help="local (default): one model group after another in this process. ray: a Ray task graph, one "
        "task per build, shared set and shard, each started once what it needs exists (pip install "
        "'robench[ray]'); same table. In a benchmark file: [execution] executor.",
    ),
    click.option(
        "--address",
        default=None,
        help="With --executor ray: the Ray cluster to join (e.g. auto, or ray://host:10001); default: start one here.",
    ),
    click.option(
        "--gpus-per-task",
        type=click.FloatRange(min=0),
        default=None,
        help="With --executor ray: GPUs per task (0.5: two shard tasks per GPU); tasks then run on CUDA "
        "(with --device cpu, on the CPU: the GPUs are then Ray's logical resources only).",
    ),
    click.option(
        "--cpus-per-task",
        type=click.IntRange(min=1),
        default=None,
        help="With --executor ray: CPU cores per task, and its torch threads (default: this process's thread "
        "count, which keeps the numbers exactly the local executor's).",
    ),
)


def execution_options(command: F) -> F:
    """Add ``robench run``'s executor flags (:mod:`robench.plan.execution`)."""
    for option in reversed(_EXECUTION_OPTIONS):
        command = option(command)
    return command


def with_execution(
    benchmark: Benchmark, executor: str | None, address: str | None, gpus: float | None, cpus: int | None
) -> Benchmark:
    """``benchmark`` with its ``[execution]`` settings overridden by the flags given."""
    execution = with_overrides(
        benchmark.execution, executor=executor, address=address, gpus_per_task=gpus, cpus_per_task=cpus
    )
    return dataclasses.replace(benchmark, execution=execution)
