"""``robench zoo``: the RobustBench models robench knows, fetching their files, pinning their hashes.

    robench zoo                                  # table: dataset, threat, architecture, published
                                                 # accuracies, files present, pinned
    robench zoo fetch Carmon2019Unlabeled        # download ahead of a run (e.g. on another machine)
    robench zoo pin --manifest team.json         # the files at hand as a manifest to commit

Provided by the robustbench plugin (``robench_commands``), not by robench's CLI: it is
RobustBench's knowledge (its zoo, its Drive ids, its published numbers), and robench's core
never imports a plugin.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

import robench
from robench.plugins.robustbench.facts import find, leaderboard, near
from robench.plugins.robustbench.pins import Pin, Pins, default_cache
from robench.plugins.robustbench.weights import (
    DATASETS,
    FILE_NAME,
    MANIFEST,
    THREAT_MODELS,
    data_root,
    read_manifest,
    sha256_file,
    weight_files,
)

_MODEL_DIR = click.option(
    "--model-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="RobustBench's model_dir (default: $ROBENCH_DATA/robustbench), as -D model_dir of the defense.",
)
_CACHE_DIR = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The cache whose first-use pins to read (default: $ROBENCH_CACHE or ~/.cache/robench), as robench run's.",
)
_DATASET = click.option("--dataset", type=click.Choice(sorted(DATASETS)), default=None, help="Only this dataset.")
_THREAT = click.option("--threat-model", type=click.Choice(THREAT_MODELS), default=None, help="Only this threat model.")


def _model_dir(given: Path | None) -> Path:
    return given if given is not None else data_root() / "robustbench"


_LIST_OPTIONS = (
    _DATASET,
    _THREAT,
    _MODEL_DIR,
    _CACHE_DIR,
    click.option(
        "--manifest", type=click.Path(dir_okay=False, path_type=Path), default=None, help="A manifest of yours."
    ),
)


def _list_options(command: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_LIST_OPTIONS):
        command = option(command)
    return command


@click.group(invoke_without_command=True)
@_list_options
@click.pass_context
def zoo(ctx: click.Context, **options: Any) -> None:
    """RobustBench models: list them (the default: `robench zoo` is `robench zoo list`), fetch their
    files, pin their hashes."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_models, **options)


@zoo.command(name="list")
@_list_options
def list_models(
    dataset: str | None, threat_model: str | None, model_dir: Path | None, cache_dir: Path | None, manifest: Path | None
) -> None:
    """The models robench knows, as RobustBench's list_available_models, with their files' state.

    clean and robust: RobustBench's published accuracies in % (robust: AutoAttack at the
    leaderboard's eps; corruptions: the mean over 15 corruptions x 5 severities). files:
    present under the model folder (k/n for an ensemble). pinned: by the manifest, at first
    use (this cache's pin file), partly, or not yet.
    """
    root = _model_dir(model_dir)
    manifest_pins = read_manifest(manifest or MANIFEST)
    pins = Pins(cache_dir or default_cache()).all()
    rows = [("model", "dataset", "threat", "architecture", "clean", "robust", "files", "pinned")]
    for key, m in sorted(leaderboard().items(), key=lambda kv: (kv[1].dataset, kv[1].threat_model, kv[1].name)):
        if dataset not in (None, m.dataset) or threat_model not in (None, m.threat_model):
            continue
        files = weight_files(m.name, len(m.files))
        present = sum((root / m.dataset / m.threat_model / f).is_file() for f in files)
        in_manifest = sum(bool(manifest_pins.get(key, {}).get(f)) for f in files)
        first_use = sum(f"{m.dataset}/{m.threat_model}/{f}" in pins for f in files)
        rows.append(
            (
                m.name,
                m.dataset,
                m.threat_model,
                m.network,
                f"{m.clean_acc:.2f}",
                "" if m.robust_acc is None else f"{m.robust_acc:.2f}",
                _count(present, len(files), "yes", "no"),
                "manifest" if in_manifest == len(files) else _count(first_use, len(files), "first use", "no"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    click.echo(f"\n{len(rows) - 1} model(s); files in {root}; pins in {Pins(cache_dir or default_cache()).path}")


def _count(n: int, total: int, every: str, none: str) -> str:
    return every if n == total else none if n == 0 else f"{n}/{total}"


@zoo.command()
@click.argument("names", nargs=-1, required=True)
@_DATASET
@_THREAT
@_MODEL_DIR
def fetch(names: tuple[str, ...], dataset: str | None, threat_model: str | None, model_dir: Path | None) -> None:
    """Download the weights files of each model NAME (or dataset/threat_model/NAME) into the model
    folder, in RobustBench's layout, as a run would; print each file's sha256. Files already
    there are kept. A name of several zoos (Standard) needs --dataset and --threat-model."""
    from robench.plugins.robustbench import RobustBenchModel
    from robench.plugins.robustbench.download import fetch as download

    for name in names:
        key = _resolve(name, dataset, threat_model)
        ds, tm, model = key.split("/")
        params = {"model_name": model, "dataset": ds, "threat_model": tm, "model_dir": str(_model_dir(model_dir))}
        defense = RobustBenchModel.create(params)
        _, remotes = defense._architecture()
        download(key, defense.folder(), remotes, lambda line: click.echo(line, err=True))
        for remote in remotes:
            path = defense.folder() / remote.file
            click.echo(f"{path}  sha256 {sha256_file(path)}")


def _resolve(name: str, dataset: str | None, threat_model: str | None) -> str:
    """``dataset/threat_model/name`` for a NAME: from robench's facts, else RobustBench's zoo
    (cifar10 and Linf unless given, as RobustBench's defaults)."""
    found = find(name, dataset, threat_model)
    if len(found) == 1:
        return found[0].key
    if len(found) > 1:
        keys = ", ".join(m.key for m in found)
        raise robench.ConfigError(f"{name} is the name of several models ({keys}): give one of these keys")
    if name.count("/") == 2:
        return name
    if dataset is None and threat_model is None and near(name):
        raise robench.ConfigError(f"robench knows no model {name!r}. Did you mean: {', '.join(near(name))}?")
    return f"{dataset or 'cifar10'}/{threat_model or 'Linf'}/{name}"


@zoo.command()
@_MODEL_DIR
@_CACHE_DIR
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("robustbench-manifest.json"),
    show_default=True,
    help="The manifest to write (entries it has are kept); give it to runs as -D manifest=FILE.",
)
def pin(model_dir: Path | None, cache_dir: Path | None, manifest: Path) -> None:
    """Write the sha256 of every weights file in the model folder into a manifest a team commits.

    A file whose hash contradicts the manifest's, or its pin from first use, is reported
    and left out (exit 1): pin only files you have checked.
    """
    root = _model_dir(model_dir)
    data = json.loads(manifest.read_text()) if manifest.is_file() else {"format": 1, "models": {}}
    pins = Pins(cache_dir or default_cache()).all()
    status, count = 0, 0
    for path in sorted(root.glob("*/*/*.pt")):
        match = FILE_NAME.fullmatch(path.name)
        ds, tm = path.parent.parent.name, path.parent.name
        if match is None or ds not in DATASETS or tm not in THREAT_MODELS:
            continue
        key = f"{ds}/{tm}/{match['name']}"
        found = sha256_file(path)
        pinned = data["models"].get(key, {}).get(path.name)
        for what, known in (("the manifest pins", pinned), ("its first use recorded", _pin(pins, path))):
            if known not in (None, found):
                click.echo(f"{path}: sha256 {found}, but {what} {known}: left out", err=True)
                status = 1
                break
        else:
            data["models"].setdefault(key, {})[path.name] = found
            count += 1
            click.echo(f"{ds}/{tm}/{path.name} {found}")
    manifest.write_text(json.dumps(data, indent=2) + "\n")
    click.echo(f"{count} file(s) pinned in {manifest}; runs use it with -D manifest={manifest}", err=True)
    sys.exit(status)


def _pin(pins: dict[str, Pin], path: Path) -> str | None:
    pin = pins.get(f"{path.parent.parent.name}/{path.parent.name}/{path.name}")
    return None if pin is None else pin.sha256
