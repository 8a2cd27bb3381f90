"""``robustbench``: any model of RobustBench's zoo, by name; its files downloaded when missing.

    robench run --dataset cifar10 --defense robustbench -D model_name=Carmon2019Unlabeled \\
        --protocol robustbench --sample-order first --n-samples 1000

The architectures are RobustBench's own constructors (``robustbench.model_zoo``, package
``robustbench==1.1.1``, imported only when a model is built: compat.py); the weights come
from a folder in RobustBench's layout, ``{model_dir}/{dataset}/{threat_model}/{name}.pt``,
and ``{name}.pt_m{i}.pt`` for member ``i`` of an ensemble (the CARD decks have 6).
``model_dir`` defaults to ``$ROBENCH_DATA/robustbench`` (``~/.cache/robench/data/robustbench``
when ``$ROBENCH_DATA`` is unset), beside the CIFAR data. A file that is missing is
downloaded by the build, from RobustBench's Google Drive ids, with RobustBench's own
downloader (download.py); offline, one error names each file, its id and the folder.
``robench zoo fetch NAME`` downloads ahead of a run (e.g. on another machine).

**Hashes.** A file is hashed each time a build reads it, from the bytes it loads. The
expected sha256 is ``-D sha256=...`` (comma-separated for an ensemble's members) or the
manifest's (``manifest.json`` in this package, or ``-D manifest=FILE``, written by ``robench
zoo pin``); these are settled at planning and are part of the model key. A file neither
pins is trusted on first use (pins.py): its hash is recorded in ``<cache>/robustbench/pins.json``
once it has loaded, and every later use must match; a changed file is refused with both
hashes. The hash of each file is also stored in the model (a buffer), so every row's
``weights_sha256`` names the file its weights came from, from robench's model cache too.

**Published numbers.** Each variant carries RobustBench's published clean and robust (or mean
corruption) accuracy (facts.py, shipped as ``leaderboard.json``); rows show them beside
robench's, and a cell that repeats the leaderboard's evaluation (the ``robustbench`` or
``corruptions`` protocol, the leaderboard's eps, ``--sample-order first``) is flagged when
robench's robust accuracy is above the published one by more than its 95 % interval.

**Outputs.** Ensembles that average their members' softmax (the CARD decks,
``Chen2020Adversarial``) are presented as the log of that average
(:class:`~robench.plugins.robustbench.weights.LogMeanSoftmax`): RobustBench's prediction,
as scores attacks can treat as logits, so the row is not flagged ``probability_outputs``.
Other models return their logits.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, cast

import click
from torch import nn

import robench
from robench.plugins.robustbench.compat import zoo_entry
from robench.plugins.robustbench.download import Remote, fetch
from robench.plugins.robustbench.facts import find, leaderboard
from robench.plugins.robustbench.pins import Pins, check, default_cache
from robench.plugins.robustbench.protocol import RobustBenchProtocol
from robench.plugins.robustbench.weights import (
    DATASETS,
    HEX,
    MANIFEST,
    SOFTMAX_ENSEMBLES,
    LogMeanSoftmax,
    data_root,
    hashes_of,
    load_into,
    read_manifest,
    read_weights,
    weight_files,
    with_hashes,
    zoo_state_dict,
)


@dataclass(frozen=True, kw_only=True)
class RobustBenchModel(robench.Defense):
    """A RobustBench model zoo entry, its weights files downloaded when missing and checked by sha256.

    Args:
        model_name: RobustBench's model name, e.g. ``Carmon2019Unlabeled`` (``robench zoo`` lists them).
        threat_model: RobustBench's zoo: ``Linf`` (its default), ``L2`` or ``corruptions``.
        dataset: the dataset the model was trained for (``cifar10``, ``cifar100``); the
            presets set it to the cell's dataset. Give it to evaluate on a dataset of your own
            with the same images and classes (e.g. a local CIFAR-10-C plugin).
        sha256: the expected sha256 of the weights file (comma-separated, in member order, for
            an ensemble); empty: the manifest's, or, where it pins none, the hash recorded at
            the file's first use (trust on first use). Given or from the manifest, it is part
            of the model key and of ``defense_params``.
        model_dir: RobustBench's ``model_dir``; empty: ``$ROBENCH_DATA/robustbench``
            (``~/.cache/robench/data/robustbench`` when ``$ROBENCH_DATA`` is unset).
        manifest: a manifest JSON file of your own (``robench zoo pin`` writes one); empty:
            the one robench ships.
    """

    name: ClassVar[str] = "robustbench"
    # 2: the model holds the sha256 of its files (a buffer), and unpinned files are trusted on first use
    revision: ClassVar[int] = 2
    # Not hyperparameters: the cell's dataset, set at planning so that each dataset of a grid
    # gets its own model and pinned hash (see __post_init__); any other dataset needs -D dataset.
    presets: ClassVar[dict[str, dict[str, object]]] = {
        "smoke": {},
        "paper": {},
        **{f"{preset}:{d}": {"dataset": d} for preset in ("smoke", "paper") for d in DATASETS},
    }
    model_name: str = ""
    threat_model: Literal["Linf", "L2", "corruptions"] = "Linf"
    dataset: str = ""
    sha256: str = ""
    model_dir: str = ""
    manifest: str = ""

    def __post_init__(self) -> None:
        """Check the names and settle the expected hashes, at planning, before any compute."""
        if not self.model_name:
            raise robench.ConfigError(
                "the robustbench defense needs -D model_name=MODEL, e.g. Carmon2019Unlabeled (robench zoo lists them)"
            )
        if self.dataset not in DATASETS:
            got = f"dataset={self.dataset!r}" if self.dataset else "this cell's dataset"
            known = _published_for(self.model_name, self.threat_model)
            run_with = " or ".join(f"--dataset {d}" for d in known or DATASETS)
            whose = f" ({self.model_name} is a {' and '.join(known)} model)" if known else ""
            raise robench.ConfigError(
                f"robustbench: {got} is not one robench evaluates RobustBench models on (cifar10, cifar100){whose}. "
                f"Run with {run_with}, or give -D dataset=... for a dataset of the same shape."
            )
        object.__setattr__(self, "sha256", ",".join(self._expected()))

    @classmethod
    def datasets_for(cls, params: Mapping[str, object]) -> tuple[str, ...]:
        """``-D dataset``, else the datasets RobustBench published ``model_name`` for (under
        ``threat_model``): ``robench run`` without ``--dataset`` evaluates there."""
        if params.get("dataset"):
            return (str(params["dataset"]),)
        return _published_for(str(params.get("model_name", "")), str(params.get("threat_model", "Linf")))

    @property
    def key(self) -> str:
        """``dataset/threat_model/model_name``: the manifest's key and RobustBench's folder."""
        return f"{self.dataset}/{self.threat_model}/{self.model_name}"

    def folder(self) -> Path:
        """Where the weights files are: ``{model_dir}/{dataset}/{threat_model}``."""
        root = Path(self.model_dir).expanduser() if self.model_dir else data_root() / "robustbench"
        return root / self.dataset / self.threat_model

    def network(self, arch: str) -> str:
        """RobustBench's architecture, whatever ``--arch`` says (e.g. ``WideResNet-28-10``)."""
        facts = leaderboard().get(self.key)
        return facts.network if facts else f"{self.model_name} (RobustBench)"

    def hashes(self) -> list[str]:
        """The expected sha256 of each weights file, in member order; empty: trust on first use."""
        return self.sha256.split(",") if self.sha256 else []

    def _expected(self) -> list[str]:
        manifest = Path(self.manifest).expanduser() if self.manifest else MANIFEST
        entries = read_manifest(manifest)
        given = [h.strip().lower() for h in self.sha256.split(",")] if self.sha256.strip() else []
        if any(not HEX.fullmatch(h) for h in given):
            raise robench.ConfigError(f"robustbench: sha256 must be 64 hex digits per file, got {self.sha256!r}")
        entry = entries.get(self.key)
        if entry is None:
            self._check_name(entries, manifest)
            return given
        files = weight_files(self.model_name, len(entry))
        if sorted(entry) != sorted(files):
            raise robench.ConfigError(f"manifest {manifest}: {self.key} lists {sorted(entry)}, expected {files}")
        pinned = [entry[f] for f in files]
        contradicted = any(p is not None and p != g for p, g in zip(pinned, given, strict=False))
        if contradicted or (given and all(pinned) and len(given) != len(pinned)):
            raise robench.ConfigError(
                f"robustbench model {self.key}: sha256={self.sha256} is not the manifest's "
                f"{','.join(map(str, pinned))} ({manifest}); for other weights, pin them in a manifest of your "
                "own (robench zoo pin --manifest FILE, then -D manifest=FILE)"
            )
        return given or (cast(list[str], pinned) if all(pinned) else [])

    def _check_name(self, entries: dict[str, dict[str, str | None]], manifest: Path) -> None:
        """A model the manifest does not list must be in RobustBench's zoo (importing robustbench: seconds)."""
        try:
            zoo_entry(self.dataset, self.threat_model, self.model_name)
        except robench.ConfigError as exc:
            names = {key.rsplit("/", 1)[1] for key in entries}  # names, not keys: every key shares a prefix
            similar = difflib.get_close_matches(self.model_name, sorted(names), n=3, cutoff=0.6)
            close = [k for k in entries if k.startswith(f"{self.dataset}/") and k.rsplit("/", 1)[1] in similar]
            hint = f" Close entries of the manifest {manifest}: {', '.join(close)}." if close else ""
            raise robench.ConfigError(f"{exc}{hint}") from None

    def _check_data(self, ctx: robench.Context) -> None:
        if ctx.dataset in DATASETS and ctx.dataset != self.dataset:
            raise robench.ConfigError(
                f"robustbench model {self.key} is a {self.dataset} model, but the cell's dataset is {ctx.dataset}: "
                f"use --dataset {self.dataset}, or the {ctx.dataset} model (-D dataset={ctx.dataset})"
            )
        s, classes = ctx.shape, DATASETS[self.dataset]
        if (s.channels, s.height, s.width, s.num_classes) != (3, 32, 32, classes):
            raise robench.ConfigError(
                f"robustbench model {self.key} takes 3x32x32 images in {classes} classes; dataset "
                f"{ctx.dataset or '?'} has {s.channels}x{s.height}x{s.width} images in {s.num_classes}"
            )

    def _architecture(self) -> tuple[Callable[[], nn.Module], list[Remote]]:
        """RobustBench's constructor for the model, and the file (with its Drive id) of each part it loads."""
        entry = zoo_entry(self.dataset, self.threat_model, self.model_name)
        ids = entry["gdrive_id"]
        if ids is None or (isinstance(ids, list) and self.model_name not in SOFTMAX_ENSEMBLES):
            raise robench.ConfigError(
                f"robustbench model {self.key} is not supported: robench loads single models kept as weights "
                f"files, and the ensembles that average softmax ({', '.join(sorted(SOFTMAX_ENSEMBLES))})"
            )
        ids = ids if isinstance(ids, list) else [ids]
        files = weight_files(self.model_name, len(ids))
        if self.hashes() and len(files) != len(self.hashes()):
            raise robench.ConfigError(
                f"robustbench model {self.key} has {len(files)} weights file(s) ({', '.join(files)}), "
                f"but {len(self.hashes())} sha256 value(s) were given"
            )
        return entry["model"], [Remote(f, i) for f, i in zip(files, ids, strict=True)]

    def fit(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """Download what is missing, build RobustBench's architecture, load the checked files into it."""
        self._check_data(ctx)
        make, remotes = self._architecture()
        fetch(self.key, self.folder(), remotes, ctx.progress.log)
        model = make()
        parts = list(cast(nn.ModuleList, model.models)) if len(remotes) > 1 else [model]
        pins = Pins(ctx.cache_root or default_cache())
        expected: Sequence[str | None] = self.hashes() or [None] * len(remotes)
        found, first_use = [], []
        for part, remote, wanted in zip(parts, remotes, expected, strict=True):
            path = self.folder() / remote.file
            data = path.read_bytes()  # one read: the bytes hashed are the bytes loaded
            digest = hashlib.sha256(data).hexdigest()
            if check(pins, self._pin_key(remote), path, digest, wanted):
                first_use.append((remote, path, digest))
            state = zoo_state_dict(read_weights(data, path), self.model_name, member=len(remotes) > 1)
            ignored = load_into(part, state, path)
            shown = ", ".join(ignored[:3]) + (", ..." if len(ignored) > 3 else "")
            extra = f"; ignored {len(ignored)} extra tensors ({shown})" if ignored else ""
            ctx.progress.log(f"robustbench: {path} (sha256 {digest[:12]}){extra}")
            found.append(digest)
        for remote, path, digest in first_use:  # recorded only once every file has loaded
            pinned = pins.record(self._pin_key(remote), digest, path)
            check(pins, self._pin_key(remote), path, digest, None)  # another process pinned another file meanwhile
            ctx.progress.log(
                f"robustbench: first use of {path}: sha256 {pinned.sha256} recorded in {pins.path}; a later run "
                "refuses the file if it changes (robench zoo pin writes a manifest to commit)"
            )
        return {"model": self._present(model, found)}

    def _pin_key(self, remote: Remote) -> str:
        return f"{self.dataset}/{self.threat_model}/{remote.file}"

    def skeletons(self, ctx: robench.Context) -> dict[str, nn.Module]:
        """RobustBench's architecture as :meth:`fit` presents it, to load cached weights into."""
        self._check_data(ctx)
        make, remotes = self._architecture()
        return {"model": self._present(make(), len(remotes))}

    def _present(self, model: nn.Module, hashes: list[str] | int) -> nn.Module:
        shown = LogMeanSoftmax(model) if self.model_name in SOFTMAX_ENSEMBLES else model
        return with_hashes(shown, hashes).eval()

    def variant(self, name: str, model: nn.Module) -> robench.Variant:
        """The model with the sha256 of the files its weights came from, and RobustBench's published numbers."""
        facts = leaderboard().get(self.key)
        return robench.Variant(
            name=name,
            model=model,
            weights_sha256=",".join(hashes_of(model)),
            reference=facts.reference() if facts else None,
        )


@robench.hookimpl
def robench_defenses() -> list[type[robench.Defense]]:
    """robustbench."""
    return [RobustBenchModel]


@robench.hookimpl
def robench_protocols() -> list[type[robench.ProtocolDef]]:
    """robustbench: the leaderboard's AutoAttack evaluation."""
    return [RobustBenchProtocol]


@robench.hookimpl
def robench_commands() -> list[click.Command]:
    """``robench zoo``: list, fetch and pin RobustBench models."""
    from robench.plugins.robustbench.cli import zoo

    return [zoo]


def _published_for(model_name: str, threat_model: str) -> tuple[str, ...]:
    """The datasets RobustBench published ``model_name`` for under ``threat_model`` (robench's facts)."""
    return tuple(sorted({m.dataset for m in find(model_name, threat_model=threat_model)})) if model_name else ()
